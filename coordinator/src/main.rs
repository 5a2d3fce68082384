//! `ward-coordinator`: the control plane and its admin CLI.
//!
//! `init` and `serve` work on the data dir directly; every other subcommand talks to the
//! running coordinator through its admin socket (`DATA_DIR/admin.sock`).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

use ward_coordinator::admin::api::fmt_time;
use ward_coordinator::admin::api::{
    render_table, AuditVerifyView, AuditView, ConsoleLinkView, DeviceDetail, DeviceRoutesView,
    DeviceTagsView, DeviceView, ExplainView, FlowsTopView, FlowsView, GrantView,
    MaturityHistoryView, MaturityView, PolicyOutcome, PolicyShowView, PolicyVersionView,
    RelayAdded, RelayView, Rotating, StatusView, Table, TokenCreated, TokenView, UserAccess,
    UserGroupsView, UserView,
};
use ward_coordinator::admin::api::{ReplayView, SuggestView, SuggestionMarkView};
use ward_coordinator::admin::flows::FlowFilter;
use ward_coordinator::admin::suggest::{MarkAsk, SuggestAsk};
use ward_coordinator::admin::{self, AdminRequest};
use ward_coordinator::datadir::DataDir;
use ward_coordinator::server;
use ward_coordinator::store::SuggestionState;

/// jemalloc for the coordinator's heap: at 10 000 sessions a policy change spent about a third
/// of its time in glibc malloc's free lists (ARCHITECTURE.md, "Third-party packages and why").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (its `malloc_conf`; `_RJEM_MALLOC_CONF` in
/// the environment is read after, and wins): one arena per CPU instead of four a CPU, so
/// memory freed by one thread serves the others (peak RSS at 10 000 sessions 1 087–1 099 →
/// 1 051–1 069 MiB, bench/README.md).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a static C string, read as one `c_char`.
    Some(unsafe { &*c"percpu_arena:percpu".as_ptr() });

#[derive(Parser)]
#[command(
    name = "ward-coordinator",
    version,
    about = "Ward control plane and admin CLI"
)]
struct Cli {
    /// The coordinator instance (data directory).
    #[arg(
        long,
        env = "WARD_DATA_DIR",
        global = true,
        default_value = "/var/lib/ward-coordinator"
    )]
    data_dir: PathBuf,
    /// The instance's PostgreSQL database, `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (`?host=/socket/dir` for a unix socket; the password may come from `PGPASSWORD`).
    /// Given to `init` to create a PostgreSQL instance, then to `serve` and the commands that
    /// open the database; without it the instance uses SQLite (`ward.db`).
    #[arg(long, env = "WARD_DATABASE_URL", global = true, hide_env_values = true)]
    database: Option<String>,
    /// Connections this coordinator keeps to PostgreSQL (each replica holds this many plus one
    /// for notifications; keep `replicas × (N + 1)` under the server's `max_connections`).
    #[arg(long, env = "WARD_DATABASE_POOL", global = true, default_value_t = 16)]
    database_pool: u32,
    /// How long a request waits for a free PostgreSQL connection before it is refused.
    #[arg(
        long,
        env = "WARD_DATABASE_POOL_WAIT",
        global = true,
        default_value = "5s"
    )]
    database_pool_wait: String,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The OpenID provider people sign in with.
#[derive(clap::Args, Debug, Clone, Default)]
struct OidcArgs {
    /// The provider's issuer URL (https).
    #[arg(long, env = "WARD_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// This coordinator's client id at the provider.
    #[arg(long, env = "WARD_OIDC_CLIENT_ID")]
    oidc_client_id: Option<String>,
    /// File holding the client secret (confidential client; first line).
    #[arg(long, env = "WARD_OIDC_CLIENT_SECRET_FILE")]
    oidc_client_secret_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the provider's TLS.
    #[arg(long, env = "WARD_OIDC_CA_FILE")]
    oidc_ca_file: Option<PathBuf>,
}

impl OidcArgs {
    /// These flags over `base` (what init stored); `None` when no provider is configured.
    fn over(
        &self,
        base: Option<ward_coordinator::oidc::OidcSettings>,
    ) -> Result<Option<ward_coordinator::oidc::OidcSettings>> {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        let mut s = match (base, &self.oidc_issuer) {
            (Some(b), _) => b,
            (None, Some(_)) => Default::default(),
            (None, None) => {
                anyhow::ensure!(
                    self.oidc_client_id.is_none() && self.oidc_client_secret_file.is_none(),
                    "--oidc-client-id needs --oidc-issuer"
                );
                return Ok(None);
            }
        };
        if let Some(i) = &self.oidc_issuer {
            s.issuer = i.clone();
        }
        if let Some(c) = &self.oidc_client_id {
            s.client_id = c.clone();
        }
        if let Some(f) = &self.oidc_client_secret_file {
            s.client_secret_file = Some(abs(f));
        }
        if let Some(f) = &self.oidc_ca_file {
            s.ca_file = Some(abs(f));
        }
        s.check()?;
        Ok(Some(s))
    }
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Create a new coordinator instance: CA, lease-signing key, address pools, database.
    Init {
        /// HOST:PORT devices will dial (carried in every enrollment token). Repeat it (or give
        /// a comma-separated list) for several coordinator replicas: devices dial the first
        /// and fail over to the others.
        #[arg(
            long = "public-addr",
            env = "WARD_PUBLIC_ADDR",
            value_delimiter = ',',
            required = true
        )]
        public_addr: Vec<String>,
        /// The DNS domain devices publish names under (`HOSTNAME.<domain>`).
        #[arg(long, env = "WARD_DNS_DOMAIN", default_value = ward_shared::names::DEFAULT_DNS_DOMAIN)]
        dns_domain: String,
        #[command(flatten)]
        oidc: OidcArgs,
    },
    /// Write this instance's secrets (CA certificate and key, lease key, audit key, config)
    /// to FILE (new, 0600) for `import-instance` on another replica's host. Keys are never
    /// printed.
    ExportInstance { file: PathBuf },
    /// Create this data directory (new or empty) as another replica of an exported instance.
    /// FILE must be readable by its owner only. Then point `ward.db` at the shared database and
    /// run `serve`.
    ImportInstance { file: PathBuf },
    /// Run the coordinator.
    Serve {
        /// Local address for the QUIC listener (default: `[::]` dual-stack, or 0.0.0.0 where the
        /// host has no IPv6, and the public address's port).
        #[arg(long, env = "WARD_LISTEN")]
        listen: Option<SocketAddr>,
        /// Default lease lifetime of a device key.
        #[arg(long, env = "WARD_LEASE_TTL", default_value = "10m")]
        lease_ttl: String,
        /// Lease lifetime for devices with a tag, e.g. `server=1h` (repeatable; the shortest wins).
        #[arg(
            long = "lease-ttl-tag",
            env = "WARD_LEASE_TTL_TAG",
            value_delimiter = ','
        )]
        lease_ttl_tag: Vec<String>,
        /// No lease lives longer than this, whatever else is configured.
        #[arg(long, env = "WARD_LEASE_MAX_TTL", default_value = "1h")]
        lease_max_ttl: String,
        /// How long flow records are kept (older ones are pruned, and not stored when a device
        /// sends them late).
        #[arg(long, env = "WARD_FLOW_RETENTION", default_value = "30d")]
        flow_retention: String,
        /// A device that may talk with more peers than this is sent only the peers it uses,
        /// each asked for as it first sends to it (0: every device; agents older than
        /// protocol 4 are always sent every peer).
        #[arg(long, env = "WARD_PEERS_ON_DEMAND_ABOVE", default_value_t = ward_coordinator::registry::DEFAULT_ON_DEMAND_ABOVE)]
        peers_on_demand_above: usize,
        /// TCP address serving Prometheus metrics at `GET /metrics` (off unless given; bind
        /// it to loopback or a management network: see docs/metrics.md).
        #[arg(long, env = "WARD_COORDINATOR_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// TCP address serving the admin web console over plain HTTP (off unless given; bind
        /// it to loopback and reach it through an SSH tunnel: see docs/console.md). Sign in
        /// with `console-link`.
        #[arg(long, env = "WARD_COORDINATOR_CONSOLE_LISTEN")]
        console_listen: Option<SocketAddr>,
        /// Members of this identity-provider group may sign in to the console with the
        /// provider (`/oidc/start`; register `http://CONSOLE_LISTEN/oidc/callback` at the
        /// provider). Without it, only `console-link` signs in.
        #[arg(
            long,
            env = "WARD_COORDINATOR_CONSOLE_ADMIN_GROUP",
            requires = "console_listen"
        )]
        console_admin_group: Option<String>,
        /// OpenID provider settings; these override what `init` stored.
        #[command(flatten)]
        oidc: OidcArgs,
        /// How often every signed-in user is re-checked with the provider (refresh token).
        #[arg(long, env = "WARD_OIDC_REFRESH_INTERVAL", default_value = "5m")]
        oidc_refresh_interval: String,
        /// A device must sign in again once its sign-in is older than this.
        #[arg(long, env = "WARD_MAX_AUTH_AGE", default_value = "24h")]
        max_auth_age: String,
        /// A first sign-in creates the Ward user (`false`: only users an admin created or linked).
        #[arg(long, env = "WARD_OIDC_CREATE_USERS", default_value_t = true, action = clap::ArgAction::Set)]
        oidc_create_users: bool,
        /// HTTP address for `POST /oidc/backchannel-logout` and `PATCH /scim/v2/Users/{sub}`.
        #[arg(long, env = "WARD_OIDC_LISTEN")]
        oidc_listen: Option<SocketAddr>,
        /// File holding the bearer token SCIM requests must carry (SCIM is off without it).
        #[arg(long, env = "WARD_SCIM_TOKEN_FILE")]
        scim_token_file: Option<PathBuf>,
        /// On PostgreSQL, wake the change feed with `LISTEN`/`NOTIFY` (`false`: poll only,
        /// every 150 ms, e.g. behind a pooler in transaction mode, where `LISTEN` cannot work).
        #[arg(long, env = "WARD_FEED_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
        feed_notify: bool,
    },
    /// The coordinator addresses devices dial (config.json): tokens and netmaps carry them.
    #[command(subcommand)]
    Addrs(AddrsCmd),
    /// Show the running coordinator's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    #[command(subcommand)]
    User(UserCmd),
    #[command(subcommand)]
    Token(TokenCmd),
    #[command(subcommand)]
    Device(DeviceCmd),
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Just-in-time access: time-bound grants that expire on their own.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// Relays: address discovery and forwarding for devices that cannot reach each other
    /// directly.
    #[command(subcommand)]
    Relay(RelayCmd),
    /// Flows from both ends of every tunnel, paired: both ends' counts, the verdict, the rule
    /// or reason, and whether the ends agree (paired, mismatch, one_sided, pending, denied).
    Flows {
        #[command(subcommand)]
        cmd: Option<FlowsCmd>,
        /// Initiators: a device or user name, user:NAME, group:NAME, tag:NAME, device:NAME.
        #[arg(long, global = true)]
        from: Option<String>,
        /// Responders, selected the same way.
        #[arg(long, global = true)]
        to: Option<String>,
        /// Denied flows only.
        #[arg(long)]
        denied: bool,
        /// Windows that ended within this long (90s, 15m, 1h, 7d).
        #[arg(long, global = true, default_value = "1h")]
        since: String,
        /// Flows this rule or grant allowed.
        #[arg(long, global = true)]
        rule: Option<String>,
        /// Flows only one end reported (after the grace period for the other's upload).
        #[arg(long)]
        one_sided: bool,
        /// Flows whose candidate verdict under the policy's shadow rules is this one
        /// (would-allow, would-deny).
        #[arg(long, value_parser = parse_shadow)]
        shadow: Option<ward_shared::flows::ShadowVerdict>,
        /// Most rows shown (the newest).
        #[arg(long, global = true, default_value_t = 500)]
        limit: usize,
        #[arg(long, global = true)]
        json: bool,
    },
    /// The zero trust maturity assessment (CISA ZTMM v2.0 stages per pillar and function),
    /// scored from this deployment's own evidence; `history` shows the recorded trend.
    Maturity {
        #[command(subcommand)]
        cmd: Option<MaturityCmd>,
        /// Add the concrete next step for every function that is not optimal.
        #[arg(long)]
        explain: bool,
        #[arg(long, global = true)]
        json: bool,
    },
    /// Print a one-time sign-in URL for the running coordinator's web console (valid for 5
    /// minutes, once).
    ConsoleLink {
        #[arg(long)]
        json: bool,
    },
    /// Show the audit log, or verify its hash chain.
    Audit {
        #[command(subcommand)]
        cmd: Option<AuditCmd>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Behaviour anomalies: where a device left its learned baseline, with a score and why.
    Anomalies {
        /// One device's anomalies only.
        #[arg(long)]
        device: Option<String>,
        /// Raised within this long (90s, 15m, 1h, 7d).
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long)]
        json: bool,
    },
    /// Act on one anomaly.
    Anomaly {
        #[command(subcommand)]
        cmd: AnomalyCmd,
    },
}

#[derive(Subcommand)]
enum AddrsCmd {
    /// List the addresses, the first one (dialled first) on top.
    Show,
    /// Replace the list (first = dialled first). A running `serve` saves it, audits it and
    /// sends it to every connected device at once; without one the file is saved for the next
    /// start. Tokens minted from now on carry it. Each replica keeps its own list.
    Set {
        #[arg(required = true, value_delimiter = ',')]
        addrs: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AnomalyCmd {
    /// Label an anomaly: `--expected` teaches the device's baseline and drops the risk it
    /// added; `--malicious` keeps the risk (and quarantines under `[trust]
    /// quarantine_malicious`).
    Ack {
        id: u64,
        #[arg(
            long,
            conflicts_with = "malicious",
            required_unless_present = "malicious"
        )]
        expected: bool,
        #[arg(long)]
        malicious: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MaturityCmd {
    /// Recorded assessments (daily and at every policy apply), oldest first: the stage per
    /// pillar and what changed; fails if the history's hash chain does not verify.
    History,
}

#[derive(Subcommand)]
enum FlowsCmd {
    /// The largest (initiator, responder, proto, port), summed over the period.
    Top {
        #[arg(long, value_enum, default_value = "bytes")]
        by: TopByArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TopByArg {
    Bytes,
    Flows,
    Denied,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user, optionally in groups.
    Add {
        name: String,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List users.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Disable a user: their devices lose access at once.
    Disable { name: String },
    /// Re-enable a disabled user.
    Enable { name: String },
    /// Add a user to groups or remove them.
    Groups {
        name: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Parse, compile against the current users and devices, run the tests. Changes nothing.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check, show what access changes, store a new version and push it.
    Apply {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the policy in force.
    Show,
    /// List applied versions.
    History {
        #[arg(long)]
        json: bool,
    },
    /// Allowed or denied, and why: SRC is a user or device, DST is SERVICE|DEVICE[:PORT[/PROTO]].
    Explain {
        src: String,
        dst: String,
        #[arg(long)]
        json: bool,
    },
    /// Least-privilege suggestions from the stored flows: rules to add, narrow or expire, and
    /// findings to investigate, each with its evidence and a confidence.
    Suggest {
        /// Flows whose windows ended within this long (90s, 15m, 1h, 7d).
        #[arg(long, default_value = "14d")]
        since: String,
        /// Evidence from fewer distinct days is low confidence (listed, not written).
        #[arg(long, default_value_t = 2)]
        min_days: u32,
        #[arg(long)]
        json: bool,
        /// Write the candidate policy here: the policy in force with the suggestions that are
        /// not low confidence applied, plus generated tests pinning the observed flows.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Write the changes as shadow rules (evaluated on live traffic, not enforced).
        #[arg(long, requires = "write")]
        shadow: bool,
    },
    /// Replay the stored flows against a candidate policy: what would newly be denied (used
    /// flows that lose access) and newly allowed. Exits 0 either way.
    Replay {
        file: PathBuf,
        #[arg(long, default_value = "14d")]
        since: String,
        #[arg(long)]
        json: bool,
    },
    /// The suggestions' lifecycle: list, accept, dismiss, snooze.
    #[command(subcommand)]
    Suggestions(SuggestionsCmd),
}

#[derive(Subcommand)]
enum SuggestionsCmd {
    /// Every current suggestion, dismissed and snoozed ones included, with its state.
    Ls {
        #[command(flatten)]
        window: SuggestWindow,
        #[arg(long)]
        json: bool,
    },
    /// Record that the suggestion was taken into a policy (applies nothing by itself).
    Accept {
        id: String,
        #[command(flatten)]
        window: SuggestWindow,
    },
    /// Hide the suggestion until it is seen with more flows or on more days.
    Dismiss {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        window: SuggestWindow,
    },
    /// Hide the suggestion until a time (RFC 3339) or for a duration (7d).
    Snooze {
        id: String,
        #[arg(long)]
        until: String,
        #[command(flatten)]
        window: SuggestWindow,
    },
}

#[derive(clap::Args)]
struct SuggestWindow {
    /// Flows whose windows ended within this long.
    #[arg(long, default_value = "14d")]
    since: String,
    /// Evidence from fewer distinct days is low confidence.
    #[arg(long, default_value_t = 2)]
    min_days: u32,
}

impl SuggestWindow {
    fn ask(&self) -> Result<SuggestAsk> {
        Ok(SuggestAsk {
            since_secs: admin::parse_duration(&self.since)?.as_secs(),
            min_days: self.min_days,
            write: false,
            shadow: false,
        })
    }
}

#[derive(Subcommand)]
enum GrantCmd {
    /// Grant USER or device:NAME access to SERVICE for a while.
    Add {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// How long: 90s, 15m, 1h (at most 7d).
        #[arg(long = "for")]
        duration: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List active grants.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a grant before it expires.
    Rm { id: String },
}

#[derive(Subcommand)]
enum RelayCmd {
    /// Register a relay; every connected device receives it in its netmap. Prints the relay's
    /// credential (`wardrelay1-…`, for `ward-relay serve --token`) alone on stdout; only its
    /// secret's hash is kept.
    Add {
        /// 1 to 63 of a-z 0-9 - (not starting or ending with -): it names the relay's TLS
        /// certificate, NAME.relay.ward.internal.
        name: String,
        /// Where devices reach the relay's UDP socket: HOST:PORT, IPv6 as [ADDR]:PORT.
        #[arg(long)]
        addr: String,
    },
    /// List relays: whether each holds a control session now, devices connected, bytes relayed.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a relay: devices stop using it and its control session ends.
    Rm { name: String },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an enrollment token; prints the token alone on stdout.
    Create {
        #[arg(long, conflicts_with = "tags", required_unless_present = "tags")]
        user: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Lifetime: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: i64,
        /// The name the enrolling device gets, bound by you (`device:NAME` rules apply to it),
        /// whatever it asks for. Without it the device's own name is a display name only.
        #[arg(long)]
        hostname: Option<String>,
    },
    /// List tokens (never their secrets).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// List devices.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device: its session closes at once and it is refused from then on.
    Revoke { name: String },
    /// Make the device rotate its WireGuard key now (new key, new lease, old one revoked).
    Rotate { name: String },
    /// Quarantine a device: only services the policy marks `remediation` stay reachable.
    Quarantine {
        name: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a device's quarantine (manual or automatic).
    Release { name: String },
    /// Rename a device and bind the new name (`device:NEW` rules apply to it); refused when
    /// another active device holds NEW bound.
    Rename {
        old: String,
        new: String,
        #[arg(long)]
        json: bool,
    },
    /// Bind a device's current, self-chosen name (`device:NAME` rules apply to it from now on).
    Approve {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a device's tags.
    Tag {
        name: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// List a device's routed prefixes (advertised, approved, active); approve or revoke
    /// some (`exit` for the exit-node offer), audited. Overlay-overlapping prefixes are refused.
    Routes {
        name: String,
        #[arg(long, num_args = 1.., value_delimiter = ',')]
        approve: Vec<String>,
        #[arg(long, num_args = 1.., value_delimiter = ',')]
        revoke: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Recompute the hash chain and check it against its keyed head and checkpoint; fails,
    /// naming which, if rows were edited or inserted (tampered), deleted from the tail
    /// (truncated), or the database is older than the checkpoint (rolled back).
    Verify,
    /// After `serve` refused a database that lost audit rows (truncated or rolled back): record
    /// the operator's acceptance in the audit log and anchor the log as it now stands. Run with
    /// the coordinator stopped; the lost changes (revocations included) must be re-applied.
    AcceptRollback {
        /// Required: the lost range's changes stay lost.
        #[arg(long)]
        i_understand: bool,
    },
}

fn main() {
    // `completions SHELL` and `man [DIR]` (hidden): generated from this clap definition.
    ward_clidoc::run_if_asked(<Cli as clap::CommandFactory>::command);
    let cli = Cli::parse();
    let mode = match cli.cmd {
        Cmd::Serve { .. } => {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            ward_runtime::cap_malloc_arenas(cpus.max(2));
            ward_runtime::Mode::Service
        }
        _ => ward_runtime::Mode::Cli,
    };
    ward_runtime::main("info", mode, run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let pool = ward_coordinator::store::postgres::PoolOptions::new(
        cli.database_pool,
        admin::parse_duration(&cli.database_pool_wait).context("--database-pool-wait")?,
    )
    .map_err(anyhow::Error::msg)?;
    let dd = DataDir::new(&cli.data_dir)
        .with_database(cli.database.clone())?
        .with_database_pool(pool);
    let sock = dd.admin_socket();
    match cli.cmd {
        Cmd::Init {
            public_addr,
            dns_domain,
            oidc,
        } => {
            let dns_domain = ward_shared::names::DnsDomain::parse(&dns_domain)
                .map_err(|e| anyhow::anyhow!("--dns-domain: {e}"))?;
            let settings = oidc.over(None)?;
            let cfg = dd.init_with(&public_addr, dns_domain, ward_runtime::now_ms())?;
            let addrs = cfg.public_addrs();
            if let Some(s) = &settings {
                s.save(&dd.path)?;
                println!("  OIDC issuer    : {} (client {})", s.issuer, s.client_id);
            }
            let ca = dd.load_ca()?;
            println!("initialised coordinator in {}", dd.path.display());
            println!("  public address : {}", addrs.join(", "));
            println!("  CA sha256      : {}", hex::encode(ca.fingerprint()));
            println!(
                "  overlay        : 100.64.0.0/10, {}/48",
                cfg.pools.v6_prefix
            );
            println!("  DNS domain     : {}", cfg.dns_domain);
            println!("  database       : {}", dd.database_display());
            println!(
                "next: ward-coordinator --data-dir {} serve",
                dd.path.display()
            );
            Ok(())
        }
        Cmd::ExportInstance { file } => {
            let s = ward_coordinator::instance::export(&dd, &file)?;
            println!(
                "exported the instance in {} to {} (0600)",
                dd.path.display(),
                file.display()
            );
            println!("  files          : {}", s.files.join(", "));
            println!("  public address : {}", s.public_addr);
            println!("  CA sha256      : {}", s.ca_sha256);
            println!("the file holds the instance's private keys: move it only over a channel you trust and delete it after import");
            Ok(())
        }
        Cmd::ImportInstance { file } => {
            let s = ward_coordinator::instance::import(&file, &dd)?;
            println!(
                "imported the instance into {} as a new replica",
                dd.path.display()
            );
            println!("  files          : {}", s.files.join(", "));
            println!("  public address : {}", s.public_addr);
            println!("  CA sha256      : {}", s.ca_sha256);
            println!(
                "next: make {} the shared database (on SQLite: a symlink to the one ward.db), then `serve`",
                dd.db_path().display()
            );
            Ok(())
        }
        Cmd::Serve {
            listen,
            metrics_listen,
            console_listen,
            console_admin_group,
            lease_ttl,
            lease_ttl_tag,
            lease_max_ttl,
            flow_retention,
            peers_on_demand_above,
            oidc,
            oidc_refresh_interval,
            max_auth_age,
            oidc_create_users,
            oidc_listen,
            scim_token_file,
            feed_notify,
        } => {
            let ms =
                |s: &str| -> Result<i64> { Ok(admin::parse_duration(s)?.as_millis().try_into()?) };
            let mut per_tag_ms = std::collections::BTreeMap::new();
            for spec in &lease_ttl_tag {
                let (tag, d) = spec
                    .split_once('=')
                    .with_context(|| format!("--lease-ttl-tag wants TAG=DURATION, got {spec:?}"))?;
                per_tag_ms.insert(tag.to_string(), ms(d)?);
            }
            let ttl = server::LeaseTtl {
                default_ms: ms(&lease_ttl)?,
                per_tag_ms,
                max_ms: ms(&lease_max_ttl)?,
            };
            anyhow::ensure!(ttl.default_ms >= 1000, "--lease-ttl must be at least 1s");
            let retention = ms(&flow_retention)?;
            anyhow::ensure!(retention >= 1000, "--flow-retention must be at least 1s");
            let settings = oidc.over(ward_coordinator::oidc::OidcSettings::load(&dd.path)?)?;
            let oidc = match settings {
                None => {
                    anyhow::ensure!(
                        oidc_listen.is_none() && scim_token_file.is_none(),
                        "--oidc-listen and --scim-token-file need an OpenID provider (--oidc-issuer)"
                    );
                    anyhow::ensure!(
                        console_admin_group.is_none(),
                        "--console-admin-group needs an OpenID provider (--oidc-issuer)"
                    );
                    None
                }
                Some(s) => {
                    let refresh = ms(&oidc_refresh_interval)?;
                    anyhow::ensure!(
                        refresh >= 1000,
                        "--oidc-refresh-interval must be at least 1s"
                    );
                    let cfg = s.resolve(oidc_create_users, refresh, ms(&max_auth_age)?)?;
                    let scim_token = scim_token_file
                        .as_deref()
                        .map(ward_coordinator::oidc::provider::read_secret)
                        .transpose()?;
                    Some(server::oidc::OidcServe {
                        cfg,
                        listen: oidc_listen,
                        scim_token,
                        console_admin_group: console_admin_group.clone(),
                    })
                }
            };
            tracing::info!(database = %dd.database_display(), "opening the database");
            server::serve(
                dd,
                listen,
                ttl,
                metrics_listen,
                console_listen,
                retention,
                peers_on_demand_above,
                oidc,
                feed_notify,
            )
            .await
        }
        Cmd::Addrs(c) => {
            let cfg = match c {
                AddrsCmd::Show => dd.load_config()?,
                AddrsCmd::Set { addrs } => {
                    // A running coordinator owns the file and tells its sessions; only when
                    // none answers on the admin socket is the file written here.
                    if tokio::net::UnixStream::connect(&sock).await.is_ok() {
                        let v: admin::api::AddrsView =
                            admin::call(&sock, &AdminRequest::AddrsSet { addrs }).await?;
                        println!(
                            "saved; sent to {} connected device{}",
                            v.sessions,
                            if v.sessions == 1 { "" } else { "s" }
                        );
                        for a in &v.addrs {
                            println!("{a}");
                        }
                        return Ok(());
                    }
                    let cfg = dd.save_public_addrs(&addrs)?;
                    tracing::info!(addrs = %addrs.join(","), "coordinator addresses changed");
                    println!("saved; `serve` is not running: it uses the new list when it starts");
                    cfg
                }
            };
            for a in cfg.public_addrs() {
                println!("{a}");
            }
            Ok(())
        }
        Cmd::Status { json } => {
            let v: StatusView = admin::call(&sock, &AdminRequest::Status).await?;
            if json {
                print_json(&v)
            } else {
                v.lines().iter().for_each(|l| println!("{l}"));
                Ok(())
            }
        }
        Cmd::User(c) => match c {
            UserCmd::Add { name, groups } => {
                let _: UserView = admin::call(
                    &sock,
                    &AdminRequest::UserAdd {
                        name: name.clone(),
                        groups,
                    },
                )
                .await?;
                eprintln!("user {name} added");
                Ok(())
            }
            UserCmd::Ls { json } => {
                let v: Vec<UserView> = admin::call(&sock, &AdminRequest::UserLs).await?;
                if json {
                    return print_json(&v);
                }
                print_table(&v);
                Ok(())
            }
            UserCmd::Disable { name } => {
                let v: UserAccess =
                    admin::call(&sock, &AdminRequest::UserDisable { name: name.clone() }).await?;
                eprintln!("user {name} disabled; {} device(s) lost access", v.devices);
                Ok(())
            }
            UserCmd::Enable { name } => {
                let _: UserAccess =
                    admin::call(&sock, &AdminRequest::UserEnable { name: name.clone() }).await?;
                eprintln!("user {name} enabled");
                Ok(())
            }
            UserCmd::Groups { name, add, remove } => {
                let v: UserGroupsView = admin::call(
                    &sock,
                    &AdminRequest::UserGroups {
                        name: name.clone(),
                        add,
                        remove,
                    },
                )
                .await?;
                eprintln!("user {name} groups: {}", list(&v.groups));
                Ok(())
            }
        },
        Cmd::Token(c) => match c {
            TokenCmd::Create {
                user,
                tags,
                ttl,
                uses,
                hostname,
            } => {
                let ttl = admin::parse_duration(&ttl)?;
                let v: TokenCreated = admin::call(
                    &sock,
                    &AdminRequest::TokenCreate {
                        user,
                        tags,
                        ttl_secs: ttl.as_secs(),
                        uses,
                        hostname,
                    },
                )
                .await?;
                println!("{}", v.token);
                Ok(())
            }
            TokenCmd::Ls { json } => {
                let v: Vec<TokenView> = admin::call(&sock, &AdminRequest::TokenLs).await?;
                if json {
                    return print_json(&v);
                }
                print_table(&v);
                Ok(())
            }
            TokenCmd::Revoke { id } => {
                let _: TokenView =
                    admin::call(&sock, &AdminRequest::TokenRevoke { id: id.clone() }).await?;
                eprintln!("token {id} revoked");
                Ok(())
            }
        },
        Cmd::Device(c) => match c {
            DeviceCmd::Ls { json } => {
                let v: Vec<DeviceView> = admin::call(&sock, &AdminRequest::DeviceLs).await?;
                if json {
                    return print_json(&v);
                }
                print_table(&v);
                Ok(())
            }
            DeviceCmd::Show { name, json } => {
                let v: DeviceDetail =
                    admin::call(&sock, &AdminRequest::DeviceShow { name }).await?;
                if json {
                    return print_json(&v);
                }
                v.device.lines().iter().for_each(|l| println!("{l}"));
                if let Some(f) = &v.flows {
                    println!("{}", f.line());
                }
                if let Some(s) = &v.sign_in {
                    println!("{}", s.line());
                }
                v.posture.lines().iter().for_each(|l| println!("{l}"));
                Ok(())
            }
            DeviceCmd::Revoke { name } => {
                let _: DeviceView =
                    admin::call(&sock, &AdminRequest::DeviceRevoke { name: name.clone() }).await?;
                eprintln!("device {name} revoked");
                Ok(())
            }
            DeviceCmd::Rotate { name } => {
                let _: Rotating =
                    admin::call(&sock, &AdminRequest::DeviceRotate { name: name.clone() }).await?;
                eprintln!("device {name} is rotating its key");
                Ok(())
            }
            DeviceCmd::Quarantine { name, reason } => {
                let _: DeviceView = admin::call(
                    &sock,
                    &AdminRequest::DeviceQuarantine {
                        name: name.clone(),
                        reason,
                    },
                )
                .await?;
                eprintln!("device {name} quarantined");
                Ok(())
            }
            DeviceCmd::Release { name } => {
                let _: DeviceView =
                    admin::call(&sock, &AdminRequest::DeviceRelease { name: name.clone() }).await?;
                eprintln!("device {name} released from quarantine");
                Ok(())
            }
            DeviceCmd::Rename { old, new, json } => {
                let v: DeviceView = admin::call(
                    &sock,
                    &AdminRequest::DeviceRename {
                        name: old.clone(),
                        new,
                    },
                )
                .await?;
                if json {
                    return print_json(&v);
                }
                eprintln!("device {old} renamed to {} (name bound)", v.hostname);
                Ok(())
            }
            DeviceCmd::Approve { name, json } => {
                let v: DeviceView =
                    admin::call(&sock, &AdminRequest::DeviceApprove { name: name.clone() }).await?;
                if json {
                    return print_json(&v);
                }
                eprintln!("device {} name bound", v.hostname);
                Ok(())
            }
            DeviceCmd::Routes {
                name,
                approve,
                revoke,
                json,
            } => {
                let v: DeviceRoutesView = admin::call(
                    &sock,
                    &AdminRequest::DeviceRoutes {
                        name,
                        approve,
                        revoke,
                    },
                )
                .await?;
                if json {
                    return print_json(&v);
                }
                println!(
                    "{:<24} {:<10} {:<8} {:<5} active",
                    "prefix", "advertised", "approved", "auto"
                );
                for r in &v.routes {
                    let yn = |b: bool| if b { "yes" } else { "no" };
                    println!(
                        "{:<24} {:<10} {:<8} {:<5} {}",
                        r.prefix,
                        yn(r.advertised),
                        yn(r.approved),
                        yn(r.auto_approved),
                        yn(r.active)
                    );
                }
                Ok(())
            }
            DeviceCmd::Tag { name, add, remove } => {
                let v: DeviceTagsView = admin::call(
                    &sock,
                    &AdminRequest::DeviceTag {
                        name: name.clone(),
                        add,
                        remove,
                    },
                )
                .await?;
                eprintln!("device {name} tags: {}", list(&v.tags));
                Ok(())
            }
        },
        Cmd::Policy(c) => policy_cmd(&sock, c).await,
        Cmd::Grant(c) => match c {
            GrantCmd::Add {
                from,
                to,
                duration,
                reason,
            } => {
                let d = admin::parse_duration(&duration)?;
                let v: GrantView = admin::call(
                    &sock,
                    &AdminRequest::GrantAdd {
                        from,
                        to,
                        for_secs: d.as_secs(),
                        reason,
                    },
                )
                .await?;
                println!("{}", v.id);
                eprintln!("grant {} expires {}", v.id, fmt_time(v.not_after_ms));
                Ok(())
            }
            GrantCmd::Ls { json } => {
                let v: Vec<GrantView> = admin::call(&sock, &AdminRequest::GrantLs).await?;
                if json {
                    return print_json(&v);
                }
                print_table(&v);
                Ok(())
            }
            GrantCmd::Rm { id } => {
                let _: GrantView =
                    admin::call(&sock, &AdminRequest::GrantRm { id: id.clone() }).await?;
                eprintln!("grant {id} removed");
                Ok(())
            }
        },
        Cmd::Relay(c) => match c {
            RelayCmd::Add { name, addr } => {
                let v: RelayAdded =
                    admin::call(&sock, &AdminRequest::RelayAdd { name, addr }).await?;
                eprintln!(
                    "relay {} ({}) added; run it with: ward-relay serve --token CREDENTIAL --listen ADDR",
                    v.relay.name, v.relay.addr
                );
                println!("{}", v.credential);
                Ok(())
            }
            RelayCmd::Ls { json } => {
                let v: Vec<RelayView> = admin::call(&sock, &AdminRequest::RelayLs).await?;
                if json {
                    return print_json(&v);
                }
                print_table(&v);
                Ok(())
            }
            RelayCmd::Rm { name } => {
                let v: RelayView = admin::call(&sock, &AdminRequest::RelayRm { name }).await?;
                eprintln!("relay {} ({}) removed", v.name, v.addr);
                Ok(())
            }
        },
        Cmd::Flows {
            cmd,
            from,
            to,
            denied,
            since,
            rule,
            one_sided,
            shadow,
            limit,
            json,
        } => {
            let filter = FlowFilter {
                from,
                to,
                denied,
                one_sided,
                rule,
                shadow,
                since_secs: admin::parse_duration(&since)?.as_secs(),
                limit,
            };
            match cmd {
                None => {
                    let v: FlowsView = admin::call(&sock, &AdminRequest::Flows(filter)).await?;
                    if json {
                        return print_json(&v);
                    }
                    print_table(&v.flows);
                    let s = &v.summary;
                    println!(
                        "{} paired, {} mismatch, {} one-sided, {} pending, {} denied; \
                         {} report(s) missing, {} record(s) dropped by devices, {} refused",
                        s.paired,
                        s.mismatch,
                        s.one_sided,
                        s.pending,
                        s.denied,
                        s.missing_seqs,
                        s.dropped_records,
                        s.refused_records
                    );
                    Ok(())
                }
                Some(FlowsCmd::Top { by }) => {
                    let by = match by {
                        TopByArg::Bytes => ward_coordinator::flows::TopBy::Bytes,
                        TopByArg::Flows => ward_coordinator::flows::TopBy::Flows,
                        TopByArg::Denied => ward_coordinator::flows::TopBy::Denied,
                    };
                    let v: Vec<FlowsTopView> =
                        admin::call(&sock, &AdminRequest::FlowsTop { filter, by }).await?;
                    if json {
                        return print_json(&v);
                    }
                    print_table(&v);
                    Ok(())
                }
            }
        }
        Cmd::Maturity { cmd, explain, json } => match cmd {
            None => {
                let v: MaturityView =
                    admin::call(&sock, &AdminRequest::Maturity { explain }).await?;
                if json {
                    return print_json(&v);
                }
                v.lines().iter().for_each(|l| println!("{l}"));
                Ok(())
            }
            Some(MaturityCmd::History) => {
                let v: MaturityHistoryView =
                    admin::call(&sock, &AdminRequest::MaturityHistory).await?;
                if json {
                    return print_json(&v);
                }
                print_table(&v.entries);
                println!("{} assessment(s); hash chain verified", v.entries.len());
                Ok(())
            }
        },
        Cmd::ConsoleLink { json } => {
            let v: ConsoleLinkView = admin::call(&sock, &AdminRequest::ConsoleLink).await?;
            if json {
                return print_json(&v);
            }
            println!("{}", v.url);
            eprintln!(
                "one-time sign-in link: valid until {} (once)",
                fmt_time(v.expires_ms)
            );
            Ok(())
        }
        Cmd::Audit {
            cmd: Some(AuditCmd::Verify),
            json,
            ..
        } => {
            let v: AuditVerifyView = admin::call(&sock, &AdminRequest::AuditVerify).await?;
            if json {
                print_json(&v)?;
            } else {
                println!("{}", v.message);
            }
            if !v.ok {
                anyhow::bail!("audit log verification FAILED: {}", v.message);
            }
            Ok(())
        }
        Cmd::Audit {
            cmd: Some(AuditCmd::AcceptRollback { i_understand }),
            ..
        } => {
            anyhow::ensure!(
                i_understand,
                "accept-rollback makes the lost audit rows (and the changes they recorded) final: \
                 pass --i-understand to go on"
            );
            let v = dd.accept_rollback(ward_runtime::now_ms())?;
            println!("accepted: {}", v.message);
            println!(
                "the audit log is anchored again; re-apply any lost changes (revocations first)"
            );
            Ok(())
        }
        Cmd::Anomalies {
            device,
            since,
            json,
        } => {
            let req = AdminRequest::Anomalies {
                device,
                since_secs: admin::parse_duration(&since)?.as_secs(),
            };
            let v: Vec<ward_coordinator::admin::api::AnomalyView> =
                admin::call(&sock, &req).await?;
            if json {
                return print_json(&v);
            }
            print_table(&v);
            Ok(())
        }
        Cmd::Anomaly {
            cmd:
                AnomalyCmd::Ack {
                    id,
                    expected: _,
                    malicious,
                    json,
                },
        } => {
            let label = if malicious {
                ward_coordinator::behaviour::Label::Malicious
            } else {
                ward_coordinator::behaviour::Label::Expected
            };
            let v: ward_coordinator::admin::api::AnomalyView =
                admin::call(&sock, &AdminRequest::AnomalyAck { id, label }).await?;
            if json {
                return print_json(&v);
            }
            println!(
                "anomaly {} on {} acknowledged as {}",
                v.id,
                v.device,
                label.as_str()
            );
            Ok(())
        }
        Cmd::Audit {
            cmd: None,
            limit,
            json,
        } => {
            let v: Vec<AuditView> = admin::call(&sock, &AdminRequest::Audit { limit }).await?;
            if json {
                return print_json(&v);
            }
            print_table(&v);
            Ok(())
        }
    }
}

async fn policy_cmd(sock: &std::path::Path, c: PolicyCmd) -> Result<()> {
    use base64::Engine;
    let read = |file: &PathBuf| -> Result<(String, String)> {
        let meta =
            std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        anyhow::ensure!(
            meta.len() <= 1024 * 1024,
            "{}: policy files are at most 1 MiB ({} bytes)",
            file.display(),
            meta.len()
        );
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "policy".into());
        Ok((
            name,
            base64::engine::general_purpose::STANDARD.encode(bytes),
        ))
    };
    match c {
        PolicyCmd::Check { file, json } => {
            let (file_name, content_b64) = read(&file)?;
            let v: PolicyOutcome = admin::call(
                sock,
                &AdminRequest::PolicyCheck {
                    file_name,
                    content_b64,
                },
            )
            .await?;
            report_policy(&v, json, false)
        }
        PolicyCmd::Apply { file, json } => {
            let (file_name, content_b64) = read(&file)?;
            let v: PolicyOutcome = admin::call(
                sock,
                &AdminRequest::PolicyApply {
                    file_name,
                    content_b64,
                },
            )
            .await?;
            report_policy(&v, json, true)
        }
        PolicyCmd::Show => {
            let v: PolicyShowView = admin::call(sock, &AdminRequest::PolicyShow).await?;
            match &v.text {
                Some(t) => {
                    eprintln!(
                        "# policy version {} ({})",
                        v.version
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into()),
                        v.created_ms.map(fmt_time).unwrap_or_default()
                    );
                    print!("{t}");
                }
                None => eprintln!("no policy applied: everything is denied"),
            }
            Ok(())
        }
        PolicyCmd::History { json } => {
            let v: Vec<PolicyVersionView> = admin::call(sock, &AdminRequest::PolicyHistory).await?;
            if json {
                return print_json(&v);
            }
            print_table(&v);
            Ok(())
        }
        PolicyCmd::Explain { src, dst, json } => {
            let v: ExplainView =
                admin::call(sock, &AdminRequest::PolicyExplain { src, dst }).await?;
            if json {
                return print_json(&v);
            }
            println!("{}", v.text);
            Ok(())
        }
        PolicyCmd::Suggest {
            since,
            min_days,
            json,
            write,
            shadow,
        } => {
            let ask = SuggestAsk {
                since_secs: admin::parse_duration(&since)?.as_secs(),
                min_days,
                write: write.is_some(),
                shadow,
            };
            let v: SuggestView = admin::call(sock, &AdminRequest::PolicySuggest(ask)).await?;
            if let (Some(path), Some(w)) = (&write, &v.written) {
                std::fs::write(path, &w.text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if json {
                return print_json(&v);
            }
            print_suggestions(&v);
            if let (Some(path), Some(w)) = (&write, &v.written) {
                println!(
                    "wrote {}: {} suggestion(s) applied, {} allow and {} deny test(s) generated, {} observed flow(s) not pinned",
                    path.display(),
                    w.applied.len(),
                    w.allow_tests,
                    w.deny_tests,
                    w.unpinned
                );
                for n in &w.notes {
                    println!("note: {n}");
                }
            }
            Ok(())
        }
        PolicyCmd::Replay { file, since, json } => {
            let (file_name, content_b64) = read(&file)?;
            let v: ReplayView = admin::call(
                sock,
                &AdminRequest::PolicyReplay {
                    file_name,
                    content_b64,
                    since_secs: admin::parse_duration(&since)?.as_secs(),
                },
            )
            .await?;
            if json {
                return print_json(&v);
            }
            print_replay(&v);
            Ok(())
        }
        PolicyCmd::Suggestions(c) => suggestions_cmd(sock, c).await,
    }
}

async fn suggestions_cmd(sock: &std::path::Path, c: SuggestionsCmd) -> Result<()> {
    let (id, state, reason, until, window) = match c {
        SuggestionsCmd::Ls { window, json } => {
            let v: SuggestView =
                admin::call(sock, &AdminRequest::SuggestionsLs(window.ask()?)).await?;
            if json {
                return print_json(&v);
            }
            print_table(&v.suggestions);
            return Ok(());
        }
        SuggestionsCmd::Accept { id, window } => {
            (id, SuggestionState::Accepted, None, None, window)
        }
        SuggestionsCmd::Dismiss { id, reason, window } => {
            (id, SuggestionState::Dismissed, Some(reason), None, window)
        }
        SuggestionsCmd::Snooze { id, until, window } => {
            (id, SuggestionState::Snoozed, None, Some(until), window)
        }
    };
    let v: SuggestionMarkView = admin::call(
        sock,
        &AdminRequest::SuggestionMark(MarkAsk {
            id,
            state,
            reason,
            until,
            ask: window.ask()?,
        }),
    )
    .await?;
    let m = &v.mark;
    match m.until_ms {
        Some(u) => println!(
            "{} {} until {}: {}",
            m.id,
            m.state.as_str(),
            fmt_time(u),
            m.subject
        ),
        None => println!("{} {}: {}", m.id, m.state.as_str(), m.subject),
    }
    Ok(())
}

/// `policy suggest`: each suggestion with its change, evidence and confidence.
fn print_suggestions(v: &SuggestView) {
    for s in &v.suggestions {
        let x = &s.suggestion;
        let e = &x.evidence;
        let state = match (s.state, s.returned) {
            (_, true) => " [dismissed before; new evidence]".to_string(),
            (Some(st), _) => format!(" [{}]", st.as_str()),
            (None, _) => String::new(),
        };
        println!(
            "{} {} ({}: {}){state}: {}",
            x.id,
            x.kind.as_str(),
            x.confidence.as_str(),
            x.confidence_reason,
            x.subject
        );
        println!("    {}", x.summary);
        println!(
            "    evidence: first seen {}, last seen {}, {} day(s), {} flow(s), {} bytes, {} source(s){}",
            e.first_seen_ms.map(fmt_time).unwrap_or_else(|| "-".into()),
            e.last_seen_ms.map(fmt_time).unwrap_or_else(|| "-".into()),
            e.days_seen,
            e.flows,
            e.bytes,
            e.sources,
            if e.one_sided > 0 {
                format!(", {} one-sided flow(s) shown, not used", e.one_sided)
            } else {
                String::new()
            }
        );
        for n in &x.notes {
            println!("    note: {n}");
        }
        if !s.writable {
            println!("    listed, not written");
        }
    }
    let writable = v.suggestions.iter().filter(|s| s.writable).count();
    println!(
        "{} suggestion(s), {} to write, from {} flow span(s) since {} (--min-days {})",
        v.suggestions.len(),
        writable,
        v.flows,
        fmt_time(v.since_ms),
        v.min_days
    );
}

/// `policy replay`: what the candidate would change, the dangerous list first.
fn print_replay(v: &ReplayView) {
    if let Some(e) = &v.error {
        println!("the candidate does not parse, nothing replayed: {e}");
        return;
    }
    let r = &v.replay;
    let show = |title: &str, flows: &[ward_coordinator::suggest::replay::ReplayFlow]| {
        if flows.is_empty() {
            println!("{title}: none");
            return;
        }
        println!("{title}:");
        for f in flows {
            println!(
                "    {} -> {} {}: {} flow(s), {} bytes, last seen {}{}{}",
                f.initiator,
                f.responder,
                f.port,
                f.flows,
                f.bytes,
                fmt_time(f.last_seen_ms),
                f.rule
                    .as_deref()
                    .map(|r| format!(", allowed by {r}"))
                    .unwrap_or_default(),
                if f.confirmed { "" } else { " (one end only)" }
            );
        }
    };
    show(
        "newly denied (used flows that would lose access)",
        &r.newly_denied,
    );
    show("newly allowed", &r.newly_allowed);
    println!(
        "{} flow(s) unchanged, {} not judged (unknown end, or denied for a reason policy does not decide), since {}",
        r.unchanged,
        r.skipped,
        fmt_time(v.since_ms)
    );
}

/// Prints a check/apply result; fails (exit 1) when the policy was refused.
fn report_policy(v: &PolicyOutcome, json: bool, apply: bool) -> Result<()> {
    if json {
        print_json(v)?;
    } else {
        for w in &v.warnings {
            println!("warning: {w}");
        }
        for t in &v.tests {
            println!("{} {}", if t.pass { "ok  " } else { "FAIL" }, t.text);
        }
        for c in &v.changes {
            println!("{c}");
        }
        if v.ok && v.changes.is_empty() {
            println!("no access changes");
        }
        if let Some(s) = &v.shadow_rules {
            println!("{s}");
        }
        if let Some(ver) = v.version {
            println!("applied as version {ver}");
        }
    }
    if !v.ok {
        anyhow::bail!("{}", v.message);
    }
    if !apply && !json {
        eprintln!("policy is valid; its tests pass");
    }
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_table<T: Table>(rows: &[T]) {
    render_table(rows).iter().for_each(|l| println!("{l}"));
}

/// A list for people: `a,b`, or `-` when empty.
fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// `--shadow would-allow|would-deny`.
fn parse_shadow(s: &str) -> Result<ward_shared::flows::ShadowVerdict, String> {
    ward_shared::flows::ShadowVerdict::parse(s)
        .ok_or_else(|| format!("{s:?}: use would-allow or would-deny"))
}
