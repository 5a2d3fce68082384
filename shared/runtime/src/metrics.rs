//! `--metrics-listen`: the Prometheus text exposition every Ward program serves, and the small
//! HTTP/1.1 responder that serves it.
//!
//! - [`Exposition`] writes the text format (version 0.0.4): one `# HELP` and `# TYPE` line per
//!   family, label values escaped, histograms with cumulative `_bucket{le=…}` lines ending in
//!   `+Inf`, then `_sum` and `_count`.
//! - [`Histogram`] counts observations into fixed buckets with atomics (no lock on the hot
//!   path); [`HistogramSnapshot::from_values`] builds one at scrape time from current values.
//! - [`serve`] answers `GET /metrics` only: one request per connection, the request head
//!   bounded in size and time, a bounded number of connections at once. A client that sends
//!   garbage, too much or too slowly gets an error status or is dropped; nothing it sends can
//!   stall the listener or panic it.
//! - [`parse_strict`] checks a scrape the way a strict scraper would (tests use it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Writes the Prometheus text format. Each family is declared once (HELP and TYPE) and its
/// samples follow it; a family declared twice is a bug in the caller, caught by the tests of
/// each program's renderer through [`parse_strict`].
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `# HELP` and `# TYPE` lines of a family.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            escape_help(help),
            kind.as_str()
        );
        self
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", fmt_value(value));
        self
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, Kind::Counter, help)
            .sample(name, &[], value as f64)
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, Kind::Gauge, help)
            .sample(name, &[], value)
    }

    /// A family with one label, one sample per value (`kind` counter or gauge).
    pub fn labelled(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        values: &[(&str, f64)],
    ) -> &mut Self {
        self.family(name, kind, help);
        for (v, x) in values {
            self.sample(name, &[(label, v)], *x);
        }
        self
    }

    /// A histogram's samples (declare the family first with [`Exposition::family`]); `labels`
    /// are added to every line.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) -> &mut Self {
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            self.out.push_str(name);
            self.out.push_str("_bucket");
            write_labels(&mut self.out, labels, Some(&fmt_value(*bound)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", h.count);
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", fmt_value(h.sum));
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", h.count);
        self
    }

    /// A histogram family with its HELP/TYPE and one unlabelled set of samples.
    pub fn histogram_family(&mut self, name: &str, help: &str, h: &HistogramSnapshot) -> &mut Self {
        self.family(name, Kind::Histogram, help)
            .histogram(name, &[], h)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Bucket upper bounds for latencies in seconds: 1 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bucket upper bounds for ages in seconds: 1 minute to 90 days.
pub const AGE_BUCKETS: &[f64] = &[
    60.0, 600.0, 3600.0, 21600.0, 86400.0, 604800.0, 2592000.0, 7776000.0,
];

/// Observations counted into fixed buckets (atomics: observing never blocks a scrape).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, then the overflow bucket (above the last bound).
    counts: Vec<AtomicU64>,
    /// The sum in microunits (seconds → microseconds), so it stays an integer atomic.
    sum_micro: AtomicU64,
}

impl Histogram {
    /// `bounds` must be sorted ascending (the constants above are).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micro
            .fetch_add((v * 1e6).round() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            count: counts.iter().sum(),
            counts: counts[..self.bounds.len()].to_vec(),
            sum: self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram at one moment, or kept by one owner: per-bucket (not cumulative) counts for each bound; `count`
/// includes observations above the last bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl HistogramSnapshot {
    /// An empty histogram with these bucket bounds (sorted ascending), for one owner to
    /// [`observe`](Self::observe) into.
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// The histogram of the given values (for distributions computed at scrape time).
    pub fn from_values(bounds: &[f64], values: impl IntoIterator<Item = f64>) -> Self {
        let mut h = Self::new(bounds);
        for v in values {
            h.observe(v);
        }
        h
    }
}

/// A label value as the text format needs it: backslash, double quote and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels
        .iter()
        .map(|(k, v)| (*k, escape_label(v)))
        .chain(le.map(|l| ("le", l.to_string())))
    {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{v}\"");
    }
    out.push('}');
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Limits of the `/metrics` responder.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request head read (request line and headers).
    pub max_request: usize,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Longest a connection may take from accept to the response written.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request: 4096,
            max_connections: 16,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped; `render` produces the body
/// for each scrape.
pub async fn serve<F, Fut>(listener: TcpListener, limits: Limits, render: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: pause instead of spinning.
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics connection refused: too many open");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let work = respond(conn, limits.max_request, move || render());
            if tokio::time::timeout(limits.timeout, work).await.is_err() {
                tracing::debug!(%peer, "metrics request timed out");
            }
            drop(permit);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with(b"HTTP/1.") {
        return Route::BadRequest;
    }
    if method != b"GET" {
        return Route::MethodNotAllowed;
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path == b"/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

async fn respond<F, Fut>(mut conn: TcpStream, max_request: usize, render: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = String>,
{
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > max_request {
            let _ = write(&mut conn, "431 Request Header Fields Too Large", "").await;
            return;
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let (status, body) = match route(&buf[..end]) {
        Route::Metrics => ("200 OK", render().await),
        Route::NotFound => ("404 Not Found", "not found\n".to_string()),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "only GET\n".to_string()),
        Route::BadRequest => ("400 Bad Request", "bad request\n".to_string()),
    };
    let _ = write(&mut conn, status, &body).await;
}

async fn write(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// One parsed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape parsed strictly: the families by name with their type, and every sample.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub families: BTreeMap<String, Kind>,
    pub samples: Vec<Sample>,
}

impl Parsed {
    /// The value of the sample with this name whose labels include all of `labels`, summed
    /// over matching samples (`None` if none match).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            if labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }
}

/// Parses a scrape strictly: every family has HELP then TYPE before its samples and is
/// declared once; every sample belongs to the family declared last (histograms: `_bucket`
/// with `le`, `_sum`, `_count`; counters end in `_total`); names and labels are well formed,
/// label values correctly escaped, no sample repeats; histogram buckets are cumulative and end
/// in `+Inf` equal to `_count`.
pub fn parse_strict(text: &str) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut current: Option<(String, Kind)> = None;
    let mut help_for: Option<String> = None;
    let mut seen: BTreeSet<(String, Vec<(String, String)>)> = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest
                .split_once(' ')
                .ok_or_else(|| at("HELP without text".into()))?;
            check_name(name).map_err(at)?;
            help_for = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("bad TYPE".into()))?;
            if help_for.as_deref() != Some(name) {
                return Err(at("TYPE without HELP just before it".into()));
            }
            let kind = match kind {
                "counter" => Kind::Counter,
                "gauge" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                other => return Err(at(format!("unknown type {other}"))),
            };
            if kind == Kind::Counter && !name.ends_with("_total") {
                return Err(at("counter name does not end in _total".into()));
            }
            if p.families.insert(name.to_string(), kind).is_some() {
                return Err(at("family declared twice".into()));
            }
            current = Some((name.to_string(), kind));
            continue;
        }
        if line.starts_with('#') {
            return Err(at("unexpected comment".into()));
        }
        let s = parse_sample(line).map_err(at)?;
        let Some((family, kind)) = &current else {
            return Err(at("sample before any TYPE".into()));
        };
        let ok = match kind {
            Kind::Counter | Kind::Gauge => &s.name == family && !s.labels.contains_key("le"),
            Kind::Histogram => {
                (s.name == format!("{family}_bucket") && s.labels.contains_key("le"))
                    || ((s.name == format!("{family}_sum") || s.name == format!("{family}_count"))
                        && !s.labels.contains_key("le"))
            }
        };
        if !ok {
            return Err(at(format!("sample does not belong to family {family}")));
        }
        let key = (
            s.name.clone(),
            s.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        if !seen.insert(key) {
            return Err(at("sample repeated".into()));
        }
        p.samples.push(s);
    }
    check_histograms(&p)?;
    Ok(p)
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| "sample without value".to_string())?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let end: Option<usize>;
        loop {
            // label name
            let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
            if r[start..].starts_with('}') {
                end = Some(start + 1);
                break;
            }
            let eq = r[start..].find('=').ok_or("label without =")? + start;
            let lname = &r[start..eq];
            if lname.is_empty()
                || !lname.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || lname.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!("bad label name {lname:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    None => return Err("unterminated label value".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        _ => return Err("bad escape in label value".into()),
                    },
                    Some('\n') => return Err("raw newline in label value".into()),
                    Some(c) => value.push(c),
                }
            }
            if labels.insert(lname.to_string(), value).is_some() {
                return Err(format!("label {lname} repeated"));
            }
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    end = Some(i + 1);
                    break;
                }
                _ => return Err("expected , or } after a label".into()),
            }
        }
        rest = &r[end.ok_or("unterminated labels")?..];
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| "no space before the value".to_string())?;
    if value.contains(' ') {
        return Err("timestamps are not used here".into());
    }
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A series' labels other than `le`, in name order.
type LabelSet = Vec<(String, String)>;

fn check_histograms(p: &Parsed) -> Result<(), String> {
    for (family, kind) in &p.families {
        if *kind != Kind::Histogram {
            continue;
        }
        // Group by the labels other than `le`.
        let mut groups: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
        let bucket = format!("{family}_bucket");
        for s in p.samples.iter().filter(|s| s.name == bucket) {
            let le = s.labels.get("le").map(String::as_str).unwrap_or_default();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>()
                    .map_err(|_| format!("{family}: bad le {le:?}"))?
            };
            let key = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            groups.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in groups {
            let mut prev = (f64::NEG_INFINITY, 0.0);
            for (le, v) in &buckets {
                if *le <= prev.0 || *v < prev.1 {
                    return Err(format!("{family}{key:?}: buckets not ascending/cumulative"));
                }
                prev = (*le, *v);
            }
            if prev.0 != f64::INFINITY {
                return Err(format!("{family}{key:?}: no +Inf bucket"));
            }
            let labels: Vec<(&str, &str)> =
                key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let count = p
                .samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count")
                        && s.labels.len() == labels.len()
                        && labels
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| s.value);
            if count != Some(prev.1) {
                return Err(format!("{family}{key:?}: +Inf bucket differs from _count"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn label_values_are_escaped_and_parse_back() {
        let mut e = Exposition::new();
        e.family(
            "ward_test_total",
            Kind::Counter,
            "A test.\nSecond line \\ too.",
        );
        e.sample("ward_test_total", &[("requirement", "a\"b\\c\nd")], 3.0);
        let text = e.finish();
        assert!(
            text.contains(r#"ward_test_total{requirement="a\"b\\c\nd"} 3"#),
            "{text}"
        );
        assert!(text.contains("# HELP ward_test_total A test.\\nSecond line \\\\ too."));
        let p = parse_strict(&text).unwrap();
        assert_eq!(p.samples[0].labels["requirement"], "a\"b\\c\nd");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 2.0, 7.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.histogram_family("ward_test_seconds", "Test.", &h.snapshot());
        let text = e.finish();
        for want in [
            "ward_test_seconds_bucket{le=\"0.1\"} 2",
            "ward_test_seconds_bucket{le=\"1\"} 3",
            "ward_test_seconds_bucket{le=\"+Inf\"} 5",
            "ward_test_seconds_sum 9.65",
            "ward_test_seconds_count 5",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        parse_strict(&text).unwrap();
        let v = HistogramSnapshot::from_values(&[0.1, 1.0], [0.05, 0.1, 0.5, 2.0, 7.0]);
        assert_eq!(v.counts, h.snapshot().counts);
        assert_eq!(v.count, 5);
    }

    #[test]
    fn strict_parser_refuses_malformed_scrapes() {
        let ok = "# HELP a_total x\n# TYPE a_total counter\na_total 1\n";
        parse_strict(ok).unwrap();
        for bad in [
            "a_total 1\n",                                                      // no TYPE
            "# TYPE a_total counter\na_total 1\n",                              // no HELP
            "# HELP a x\n# TYPE a counter\na 1\n", // counter without _total
            "# HELP a_total x\n# TYPE a_total counter\nb_total 1\n", // other family
            "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"x} 1\n", // unterminated
            "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"\\q\"} 1\n", // bad escape
            "# HELP a_total x\n# TYPE a_total counter\na_total one\n", // bad value
            "# HELP a_total x\n# TYPE a_total counter\na_total 1\na_total 2\n", // repeated
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} 1\n\
             h_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n", // not cumulative
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n", // no +Inf
        ] {
            assert!(parse_strict(bad).is_err(), "accepted:\n{bad}");
        }
    }

    #[test]
    fn routes_only_get_metrics() {
        assert_eq!(route(b"GET /metrics HTTP/1.1"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
        assert_eq!(route(b"GET /metrics"), Route::BadRequest);
        assert_eq!(route(b"\xff\x00\x01"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }

    async fn exchange(addr: std::net::SocketAddr, req: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(req).await.unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn endpoint_answers_scrapes_and_survives_bad_clients() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let limits = Limits {
            max_request: 1024,
            max_connections: 2,
            timeout: Duration::from_millis(1000),
        };
        tokio::spawn(serve(l, limits, || async {
            "# HELP a_total x\n# TYPE a_total counter\na_total 1\n".to_string()
        }));
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("a_total 1\n"), "{ok}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let other = exchange(addr, b"GET /debug HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let garbage = exchange(addr, b"\x00\xff garbage\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        let huge = exchange(addr, &vec![b'A'; 64 * 1024]).await;
        assert!(huge.starts_with("HTTP/1.1 431"), "{huge}");
        // Two silent clients hold every slot until their timeout; a scrape meanwhile is
        // refused, and one after the timeout succeeds.
        let s1 = TcpStream::connect(addr).await.unwrap();
        let s2 = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let during = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(during.is_empty(), "{during}");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let after = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(after.starts_with("HTTP/1.1 200 OK"), "{after}");
        drop((s1, s2));
    }
}
