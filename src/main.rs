//! The `threadchat` binary: parse options, set up logging and signals, pick a
//! broker, serve. The only place that formats an error chain for a person.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::thread;

use anyhow::Context as _;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, SharedLogger, TermLogger, TerminalMode, WriteLogger,
};

use threadchat::THREAD_STACK_SIZE;
use threadchat::config::{Args, Config};
use threadchat::server::{Server, ServerError, ShutdownHandle};

fn main() -> ExitCode {
    let args = Args::parse();
    // `threadchat token NAME` prints a token instead of serving.
    #[cfg(feature = "tokens")]
    if let Some(command) = args.command {
        return exit(token::print(&args.tokens, command));
    }
    exit(run(args))
}

/// The exit status of `result`, its error told on stderr.
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, and what to do about it.
            eprintln!("threadchat: {e:#}{}", hint(&e));
            ExitCode::FAILURE
        }
    }
}

/// What a person can do about `e`, when there is one obvious thing: a
/// taken port is most often another threadchat, or anything on 8000.
fn hint(e: &anyhow::Error) -> &'static str {
    match e.downcast_ref::<ServerError>() {
        Some(ServerError::Bind { source, .. })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            " (another program holds that port: choose another with --port, \
             or THREADCHAT_PORT; with make: make run ARGS=\"--port 8001\")"
        }
        _ => "",
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    init_logging(&config)?;

    let server = Server::build(&config)?;
    let (ws, http) = if config.is_tls() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    log::info!(
        "threadchat listening on {ws}://{}/chat/{{nickname}} (relay: {}, max {} connections)",
        server.local_addr(),
        server.relay(),
        config.limits.max_connections
    );
    // Where a person can go now, as addresses that work as printed (not
    // 0.0.0.0, which a browser cannot open).
    let reachable = reachable(server.local_addr());
    // A certificate nobody vouches for: websocat must be told (`-k`).
    let insecure = if config.is_self_signed_tls() {
        "-k "
    } else {
        ""
    };
    // With tokens, a bare websocat line would only be refused.
    let terminal = if config.requires_tokens() {
        format!(
            "websocat -E {insecure}\"{ws}://{reachable}/chat/alice?token=$(threadchat token alice …)\""
        )
    } else {
        format!("websocat -E {insecure}{ws}://{reachable}/chat/alice")
    };
    log::info!("open {http}://{reachable}/ in a browser, or chat from a terminal: {terminal}");
    // The default, so say what it means: an open chat on the network.
    if server.local_addr().ip().is_unspecified() && !config.requires_tokens() {
        log::warn!(
            "listening on every address without tokens: anyone who can reach port {} can chat \
             (--host 127.0.0.1 keeps it on this machine; with make: make run ARGS=\"--host 127.0.0.1\")",
            server.local_addr().port()
        );
    }

    let shutdown = server.shutdown_handle();
    // SIGHUP reloads the certificate; without one it keeps its usual
    // meaning (a closed terminal ends the server).
    let handled: &[i32] = if config.is_tls() {
        &[SIGINT, SIGTERM, SIGHUP]
    } else {
        &[SIGINT, SIGTERM]
    };
    let mut signals = Signals::new(handled).context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let reload = Reload::of(&config);
    let signal_thread = thread::Builder::new()
        .name("tc-signals".into())
        .stack_size(THREAD_STACK_SIZE)
        .spawn(move || watch_signals(&mut signals, &shutdown, &reload))
        .context("cannot start the signal thread")?;

    server.run();

    // Ends `watch_signals`' loop, so the thread can be joined.
    signal_handle.close();
    let _ = signal_thread.join();
    Ok(())
}

/// `threadchat token NAME` (the `tokens` feature).
#[cfg(feature = "tokens")]
mod token {
    use anyhow::Context as _;
    use threadchat::auth::Signer;
    use threadchat::config::{AUTH_SECRET_ENV, Command, TokenArgs, auth_secret};

    /// Prints a token signed with the configured key.
    pub fn print(args: &TokenArgs, command: Command) -> anyhow::Result<()> {
        let Command::Token {
            name,
            lifetime,
            rooms,
            private_key,
        } = command;
        let signer = match private_key {
            Some(file) => {
                let pem = std::fs::read(&file)
                    .with_context(|| format!("cannot read --private-key {}", file.display()))?;
                Signer::private_key(&pem).map_err(anyhow::Error::msg)?
            }
            None => {
                let secret = auth_secret(args.auth_secret_file.as_deref())?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "no key to sign with: give --auth-secret-file FILE (or set \
                         {AUTH_SECRET_ENV}), or --private-key FILE"
                    )
                })?;
                Signer::hmac(&secret).map_err(anyhow::Error::msg)?
            }
        };
        let token = signer
            .stamping(args.auth_audience.as_deref(), args.auth_issuer.as_deref())
            .sign(&name, std::time::Duration::from_secs(lifetime), &rooms)
            .map_err(anyhow::Error::msg)?;
        println!("{token}");
        Ok(())
    }
}

/// The address a client on this machine uses to reach `bound`: the
/// loopback address when the server listens on every address.
fn reachable(bound: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, bound.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, bound.port()).into(),
        _ => bound,
    }
}

/// What SIGHUP reads again: the TLS certificate and key, if any.
struct Reload {
    #[cfg(feature = "tls")]
    certificates: Option<std::sync::Arc<threadchat::config::Certificates>>,
}

impl Reload {
    fn of(_config: &Config) -> Reload {
        Reload {
            #[cfg(feature = "tls")]
            certificates: _config.tls.clone(),
        }
    }

    /// Reads the files again; a failure keeps what was read before.
    fn reload(&self) {
        #[cfg(feature = "tls")]
        if let Some(certificates) = &self.certificates {
            let path = certificates.cert_path().display();
            match certificates.reload() {
                Ok(()) => log::info!("SIGHUP: reloaded the certificate and key ({path})"),
                Err(e) => log::error!("SIGHUP: kept the certificate in use: {e}"),
            }
        }
    }
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once. SIGHUP:
/// read the certificate again.
fn watch_signals(signals: &mut Signals, shutdown: &ShutdownHandle, reload: &Reload) {
    for signal in signals.forever() {
        if signal == SIGHUP {
            reload.reload();
            continue;
        }
        if shutdown.is_requested() {
            log::warn!("second signal: exiting now");
            std::process::exit(130);
        }
        let name = if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        log::info!("{name} received: shutting down (send it again to exit at once)");
        shutdown.shutdown();
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let log_config = ConfigBuilder::new()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .add_filter_ignore_str("tungstenite")
        .add_filter_ignore_str("redis")
        .build();
    let mut loggers: Vec<Box<dyn SharedLogger>> = vec![TermLogger::new(
        config.log_level,
        log_config.clone(),
        TerminalMode::Stderr,
        if std::io::stderr().is_terminal() {
            ColorChoice::Auto
        } else {
            ColorChoice::Never
        },
    )];
    if let Some(path) = &config.log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open log file {}", path.display()))?;
        loggers.push(WriteLogger::new(config.log_level, log_config, file));
    }
    CombinedLogger::init(loggers).context("cannot set up logging")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::reachable;

    #[test]
    fn a_server_on_every_address_is_reached_on_loopback() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(reachable(at("0.0.0.0:8000")), at("127.0.0.1:8000"));
        assert_eq!(reachable(at("[::]:8000")), at("[::1]:8000"));
        assert_eq!(reachable(at("10.1.2.3:8000")), at("10.1.2.3:8000"));
    }
}
