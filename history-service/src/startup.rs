//! Start-up failures of both binaries (this one and the gateway) as one line that names the
//! setting to change: clap's own report of a bad value spans three lines and names only the
//! flag, and a bare bind error does not say which address was taken.

use std::net::SocketAddr;

use clap::error::{ContextKind, ContextValue};
use clap::Parser;

/// Parses flags and environment. A bad flag or `CHAT_*` value prints one line
/// (`gateway: invalid value 'x' for --listen / CHAT_LISTEN: invalid socket address syntax`) and
/// exits with status 2, as clap would; `--help` and `--version` print as usual.
pub fn parse<T: Parser>() -> T {
    T::try_parse().unwrap_or_else(|e| {
        if !e.use_stderr() {
            e.exit()
        }
        let cmd = T::command();
        eprintln!("{}: {}", cmd.get_name(), one_line(&e, &cmd));
        std::process::exit(2)
    })
}

/// clap's first line, without its `error: ` prefix, the argument (`'--listen <LISTEN>'`)
/// named as its flag and its variable.
fn one_line(e: &clap::Error, cmd: &clap::Command) -> String {
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return first.to_owned();
    };
    let long = arg.trim_start_matches('-').split([' ', '=']).next();
    let env = cmd
        .get_arguments()
        .find(|a| a.get_long().is_some() && a.get_long() == long)
        .and_then(|a| a.get_env());
    match (long, env) {
        (Some(long), Some(env)) => first.replace(
            &format!("'{arg}'"),
            &format!("--{long} / {}", env.to_string_lossy()),
        ),
        _ => first.to_owned(),
    }
}

/// Binds the listening socket; the error names the address and the setting that changes it.
pub async fn bind(
    addr: SocketAddr,
    setting: &str,
    flag: &str,
) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr}: {e} (choose another address with {setting} or {flag})")
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[derive(Debug, Parser)]
    #[command(name = "demo")]
    struct Demo {
        #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:1")]
        listen: SocketAddr,
        #[arg(long)]
        count: Option<u32>,
    }

    fn error_line(args: &[&str]) -> String {
        let e = Demo::try_parse_from(args).unwrap_err();
        one_line(&e, &Demo::command())
    }

    #[test]
    fn a_bad_value_is_one_line_naming_flag_and_variable() {
        assert_eq!(
            error_line(&["demo", "--listen", "nope"]),
            "invalid value 'nope' for --listen / DEMO_LISTEN: invalid socket address syntax"
        );
        // No variable: the flag alone, as clap names it.
        let line = error_line(&["demo", "--count", "x"]);
        assert!(
            line.starts_with("invalid value 'x' for '--count <COUNT>'"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let line = error_line(&["demo", "--nope"]);
        assert!(line.starts_with("unexpected argument '--nope'"), "{line}");
    }
}
