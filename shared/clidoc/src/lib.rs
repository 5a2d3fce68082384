//! Shell completions and man pages generated from a Ward program's own clap definition, so
//! what is shipped always matches the flags the binary takes.
//!
//! Each binary calls [`run_if_asked`] first thing in `main`. Two hidden commands are answered
//! there, before the program's own parser runs (they are not part of its clap definition, so
//! they appear in neither its help nor its completions):
//!
//! - `PROG completions bash|zsh|fish|elvish|powershell`: the completion script on stdout;
//! - `PROG man [DIR]`: without DIR the program's main page on stdout; with DIR one page per
//!   command and visible subcommand (`ward-coordinator.1`, `ward-coordinator-device.1`,
//!   `ward-coordinator-device-ls.1`, …) written into DIR.
//!
//! `scripts/package.sh` uses them to build the Debian packages' completion and man files.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

use clap::Command;
use clap_complete::Shell;

/// What the hidden commands asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Print the completion script for this shell.
    Completions(Shell),
    /// Print the main man page (`None`) or write every page into the directory.
    Man(Option<std::path::PathBuf>),
}

/// Errors of the hidden commands: a bad argument or a failed write.
#[derive(Debug)]
pub enum Error {
    Usage(String),
    Io(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Usage(m) => f.write_str(m),
            Error::Io(e) => write!(f, "writing: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

const SHELLS: &str = "bash, zsh, fish, elvish, powershell";

/// Reads the arguments after the program name: `Ok(None)` when they are not one of the hidden
/// commands (the program parses them itself), `Err` when they are but malformed.
pub fn parse(args: &[OsString]) -> Result<Option<Ask>, Error> {
    let Some(first) = args.first().and_then(|a| a.to_str()) else {
        return Ok(None);
    };
    let rest: Vec<&str> = args[1..].iter().filter_map(|a| a.to_str()).collect();
    if rest.len() != args.len() - 1 {
        return Err(Error::Usage("arguments must be UTF-8".into()));
    }
    match (first, rest.as_slice()) {
        ("completions", [shell]) => {
            let shell = shell
                .parse::<Shell>()
                .map_err(|_| Error::Usage(format!("unknown shell {shell:?}: one of {SHELLS}")))?;
            Ok(Some(Ask::Completions(shell)))
        }
        ("completions", _) => Err(Error::Usage(format!(
            "usage: completions SHELL (one of {SHELLS})"
        ))),
        ("man", []) => Ok(Some(Ask::Man(None))),
        ("man", [dir]) => Ok(Some(Ask::Man(Some(dir.into())))),
        ("man", _) => Err(Error::Usage("usage: man [DIR]".into())),
        _ => Ok(None),
    }
}

/// Answers `ask` for the program `cmd`, writing to `out` (completions, or the one page).
/// The text is rendered in memory first (clap_complete panics on a failed write), so a write
/// error, such as a closed pipe, is returned.
pub fn answer(mut cmd: Command, ask: &Ask, out: &mut dyn Write) -> Result<(), Error> {
    let mut text = Vec::new();
    match ask {
        Ask::Completions(shell) => {
            let name = cmd.get_name().to_string();
            clap_complete::generate(*shell, &mut cmd, name.clone(), &mut text);
            if *shell == Shell::Bash {
                text = fix_bash_labels(&name, &text);
            }
        }
        Ask::Man(None) => clap_mangen::Man::new(cmd).render(&mut text)?,
        Ask::Man(Some(dir)) => return write_man_pages(cmd, dir),
    }
    out.write_all(&text)?;
    Ok(())
}

/// clap_complete's bash script for a program whose name has a `-` (`ward-coordinator`) sets
/// `cmd="ward__coordinator__subcmd__device"` but labels that case
/// `ward__subcmd__coordinator__subcmd__device)`, so nothing after the first subcommand
/// completes. The labels are renamed to what `cmd` is set to.
fn fix_bash_labels(name: &str, script: &[u8]) -> Vec<u8> {
    const SEP: &str = "__subcmd__";
    if !name.contains('-') {
        return script.to_vec();
    }
    let wrong = format!("{}{SEP}", name.replace('-', SEP));
    let right = format!("{}{SEP}", name.replace('-', "__"));
    String::from_utf8_lossy(script)
        .replace(&wrong, &right)
        .into_bytes()
}

/// Writes one page per command and visible subcommand into `dir` (created if missing).
pub fn write_man_pages(cmd: Command, dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    Ok(())
}

/// When the process was started as `PROG completions SHELL` or `PROG man [DIR]`, answers and
/// exits (0, or 2 with one line on stderr for a bad argument or a failed write); otherwise
/// returns and the program goes on to parse its arguments itself.
pub fn run_if_asked(cmd: impl FnOnce() -> Command) {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let ask = match parse(&args) {
        Ok(None) => return,
        Ok(Some(ask)) => ask,
        Err(e) => exit_with(&e),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match answer(cmd(), &ask, &mut out).and_then(|()| out.flush().map_err(Error::Io)) {
        Ok(()) => std::process::exit(0),
        // The reader stopped reading (`| head`): nothing left to say.
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => exit_with(&e),
    }
}

fn exit_with(e: &Error) -> ! {
    eprintln!("error: {e}");
    std::process::exit(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn sample() -> Command {
        Command::new("demo")
            .about("A demo program")
            .arg(
                Arg::new("socket")
                    .long("socket")
                    .global(true)
                    .help("The socket"),
            )
            .subcommand(
                Command::new("status")
                    .about("Show the status")
                    .arg(Arg::new("json").long("json").action(ArgAction::SetTrue)),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn other_arguments_are_left_to_the_program() {
        assert_eq!(parse(&os(&[])).unwrap(), None);
        assert_eq!(parse(&os(&["status", "--json"])).unwrap(), None);
        assert_eq!(parse(&os(&["--socket", "x", "man"])).unwrap(), None);
    }

    #[test]
    fn hidden_commands_are_recognized() {
        assert_eq!(
            parse(&os(&["completions", "bash"])).unwrap(),
            Some(Ask::Completions(Shell::Bash))
        );
        assert_eq!(
            parse(&os(&["completions", "fish"])).unwrap(),
            Some(Ask::Completions(Shell::Fish))
        );
        assert_eq!(parse(&os(&["man"])).unwrap(), Some(Ask::Man(None)));
        assert_eq!(
            parse(&os(&["man", "/tmp/x"])).unwrap(),
            Some(Ask::Man(Some("/tmp/x".into())))
        );
    }

    #[test]
    fn malformed_hidden_commands_are_errors() {
        let e = parse(&os(&["completions", "tcsh"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown shell \"tcsh\""), "{e}");
        assert!(parse(&os(&["completions"])).is_err());
        assert!(parse(&os(&["completions", "bash", "zsh"])).is_err());
        assert!(parse(&os(&["man", "a", "b"])).is_err());
    }

    #[test]
    fn completions_name_the_subcommands_and_flags() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            answer(sample(), &Ask::Completions(shell), &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("status"), "{shell}: {text}");
            assert!(text.contains("json"), "{shell}: {text}");
        }
    }

    /// Every `cmd="NAME"` the bash script sets has its `NAME)` case, for a program whose
    /// name has a `-` too: otherwise nested subcommands and their flags do not complete.
    #[test]
    fn bash_completion_cases_match_the_commands_they_select() {
        for name in ["demo", "demo-tool"] {
            let cmd =
                sample().name(name).subcommand(
                    Command::new("device").subcommand(
                        Command::new("ls")
                            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue)),
                    ),
                );
            let mut out = Vec::new();
            answer(cmd, &Ask::Completions(Shell::Bash), &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            let labels: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter_map(|l| l.strip_suffix(')'))
                .collect();
            let selected: Vec<&str> = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("cmd=\""))
                .filter_map(|l| l.strip_suffix('"'))
                .filter(|c| !c.is_empty())
                .collect();
            assert!(selected.len() >= 4, "{name}: {selected:?}");
            for c in selected {
                assert!(labels.contains(&c), "{name}: no case for {c}\n{text}");
            }
        }
    }

    /// A writer that fails like a closed pipe.
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_is_an_error_not_a_panic() {
        for ask in [Ask::Completions(Shell::Bash), Ask::Man(None)] {
            match answer(sample(), &ask, &mut Closed) {
                Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe),
                other => panic!("{ask:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_main_page_is_roff_with_the_commands() {
        let mut out = Vec::new();
        answer(sample(), &Ask::Man(None), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(".ie"), "{text}");
        assert!(text.contains(".TH demo 1"), "{text}");
        assert!(text.contains("A demo program"), "{text}");
        assert!(text.contains("status"), "{text}");
    }

    #[test]
    fn every_visible_subcommand_gets_a_page() {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("man1");
        answer(sample(), &Ask::Man(Some(out_dir.clone())), &mut Vec::new()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["demo-status.1", "demo.1"]);
    }
}
