//! The dense policy of the control-plane load benchmarks, one source for both tools:
//! `client/examples/load.rs` (real sessions) and `coordinator/examples/netmap_bench.rs
//! --load-shape` (the coordinator's core alone). Included with `#[path]`.

/// 10 groups of `percent`% of the users each (70 by default), `g-all` of all of them, 25
/// services on the groups, `rules - 1` rules between them and one rule to the `everyone`
/// service, whose port changes with `version` (so a new version changes every device's
/// inbound filter).
pub fn dense_policy(users: &[String], rules: usize, percent: usize, version: u32) -> String {
    use std::fmt::Write;
    let list = |f: &dyn Fn(usize) -> bool| {
        users
            .iter()
            .enumerate()
            .filter(|(i, _)| f(*i))
            .map(|(_, u)| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut p = String::from("# ward load: the dense policy (generated)\n[groups]\n");
    for g in 0..10 {
        let _ = writeln!(
            p,
            "g{g} = [{}]",
            list(&|u| ((u + g * 7) % users.len()) * 100 < percent * users.len())
        );
    }
    let _ = writeln!(p, "g-all = [{}]\n", list(&|_| true));
    for s in 0..25 {
        let _ = writeln!(
            p,
            "[services.s{s}]\ndevices = [\"group:g{}\"]\nports = [\"tcp/{}\", \"udp/{}\"]\n",
            s % 10,
            2000 + s,
            3000 + s
        );
    }
    let _ = writeln!(
        p,
        "[services.everyone]\ndevices = [\"group:g-all\"]\nports = [\"tcp/{}\", \"icmp\"]\n",
        40_000 + version
    );
    for r in 0..rules.saturating_sub(1) {
        let _ = writeln!(
            p,
            "[[rules]]\nname = \"r{r}\"\nfrom = [\"group:g{}\"]\nto = [\"s{}\"]\n",
            r % 10,
            (r * 7) % 25
        );
    }
    let _ = writeln!(
        p,
        "[[rules]]\nname = \"everyone\"\nfrom = [\"group:g0\"]\nto = [\"everyone\"]"
    );
    p
}
