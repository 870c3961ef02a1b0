//! Where Redis is: `--redis` read into a [`RedisTarget`] — a host as the
//! original app took it, a `redis://` URL, Sentinel or Cluster URLs, and
//! each of them over TLS with `rediss` (the `redis-ha` and `tls` wings
//! refuse what was left out of the build, by name).

use super::args::Args;
use super::error::ConfigError;
#[cfg(feature = "tls")]
use super::redis_tls::{RedisTls, RedisTlsArgs};

/// Where messages are relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// This Redis; failing to reach it at start is an error.
    Redis(RedisTarget),
    /// Redis on localhost:6379 if it answers, otherwise in-process.
    Auto,
    /// In-process, by request.
    InProcess,
}

/// Where Redis is, as `--redis` says, and (with `rediss`) the TLS every
/// connection to it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server, by its URL (`redis://…`, `rediss://…`, or a Unix socket).
    Server {
        /// The URL.
        url: String,
        /// With `rediss://`, the certificates to trust and show.
        #[cfg(feature = "tls")]
        tls: Option<RedisTls>,
    },
    /// Sentinels, asked in turn where a master is.
    Sentinel {
        /// `host:port` of each sentinel.
        sentinels: Vec<String>,
        /// The master's name in the sentinels' configuration.
        master: String,
        /// The master's password, if it has one.
        password: Option<String>,
        /// The master's database number.
        db: i64,
        /// With `rediss+sentinel://`: TLS to the sentinels and the master.
        #[cfg(feature = "tls")]
        tls: Option<RedisTls>,
    },
    /// A Redis Cluster, found through any of its seed nodes.
    Cluster {
        /// `host:port` of each seed node, asked in turn for the slot map.
        seeds: Vec<String>,
        /// The nodes' password, if they have one.
        password: Option<String>,
        /// With `rediss+cluster://`: TLS to every node.
        #[cfg(feature = "tls")]
        tls: Option<RedisTls>,
    },
}

impl RedisTarget {
    /// The target as a URL, for messages (a server's password included:
    /// the broker redacts it).
    pub fn url(&self) -> String {
        let s = if self.tls().is_some() { "s" } else { "" };
        match self {
            RedisTarget::Server { url, .. } => url.clone(),
            RedisTarget::Sentinel {
                sentinels, master, ..
            } => format!("redis{s}+sentinel://{}/{master}", sentinels.join(",")),
            RedisTarget::Cluster { seeds, .. } => {
                format!("redis{s}+cluster://{}", seeds.join(","))
            }
        }
    }

    /// One server at `url` (`redis://`: no TLS).
    pub fn server(url: &str) -> RedisTarget {
        RedisTarget::Server {
            url: url.to_owned(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// With `rediss`, how every connection makes its TLS session.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<&RedisTls> {
        match self {
            RedisTarget::Server { tls, .. }
            | RedisTarget::Sentinel { tls, .. }
            | RedisTarget::Cluster { tls, .. } => tls.as_ref(),
        }
    }

    /// Without the `tls` feature there is never TLS.
    #[cfg(not(feature = "tls"))]
    pub fn tls(&self) -> Option<&std::convert::Infallible> {
        None
    }
}

/// Why `--redis redis+sentinel://…` or `redis+cluster://…` is refused by
/// a build without the `redis-ha` feature.
pub const NO_REDIS_HA: &str = "Sentinel and Cluster are not built into this threadchat: \
     build it with the `redis-ha` feature (on by default; `cargo build --features redis-ha`)";

/// Why `--redis rediss://…` is refused by a build without the `tls`
/// feature.
pub const NO_TLS: &str = "TLS (rediss://) is not built into this threadchat: \
     build it with the `tls` feature (on by default; `cargo build --features tls`)";

/// The URL tried when no `--redis` is given.
pub const DEFAULT_REDIS_URL: &str = "redis://localhost:6379";

/// The `--redis-*` TLS options a `rediss` URL is read with (none without
/// the `tls` feature).
#[cfg(feature = "tls")]
pub(super) type TlsOptions = RedisTlsArgs;
#[cfg(not(feature = "tls"))]
pub(super) type TlsOptions = ();

#[cfg(feature = "tls")]
pub(super) fn tls_options(args: &Args) -> TlsOptions {
    args.redis_tls.clone()
}

#[cfg(not(feature = "tls"))]
pub(super) fn tls_options(_args: &Args) -> TlsOptions {}

/// The TLS a `rediss` URL asks for: the files of `options`, read now.
#[cfg(feature = "tls")]
type Tls = Option<RedisTls>;
#[cfg(not(feature = "tls"))]
type Tls = ();

/// Reads `--redis`: a host or host:port, as the original app took it
/// (`redis://{host}`); a `redis://` URL;
/// `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`; or
/// `redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT…]`. Each scheme with
/// `rediss` for `redis` is the same over TLS, with the files `options`
/// name.
#[cfg_attr(not(feature = "tls"), allow(clippy::let_unit_value))]
pub(super) fn redis_target(value: &str, options: &TlsOptions) -> Result<RedisTarget, ConfigError> {
    let fail = |reason: &str| ConfigError::Redis {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(fail("empty"));
    }
    let Some((scheme, rest)) = value.split_once("://") else {
        let url = format!("redis://{value}");
        redis::Client::open(url.as_str()).map_err(|e| fail(&e.to_string()))?;
        return Ok(RedisTarget::server(&url));
    };
    // `rediss…` is `redis…` over TLS.
    let (scheme, over_tls) = match scheme.strip_prefix("rediss") {
        Some(topology) => (format!("redis{topology}"), true),
        None => (scheme.to_owned(), false),
    };
    if over_tls && !cfg!(feature = "tls") {
        return Err(fail(NO_TLS));
    }
    match scheme.as_str() {
        "redis" | "redis+unix" | "unix" => {}
        "redis+sentinel" | "redis+cluster" if !cfg!(feature = "redis-ha") => {
            return Err(fail(NO_REDIS_HA));
        }
        "redis+sentinel" | "redis+cluster" => {}
        _ => return Err(fail("expected a host, host:port, or a redis:// URL")),
    }
    let tls = tls_for(over_tls, options)?;
    match scheme.as_str() {
        "redis+sentinel" => sentinel_target(rest, tls).map_err(|reason| fail(&reason)),
        "redis+cluster" => cluster_target(rest, tls).map_err(|reason| fail(&reason)),
        _ => {
            let client = redis::Client::open(value).map_err(|e| fail(&e.to_string()))?;
            if let redis::ConnectionAddr::TcpTls { insecure: true, .. } =
                client.get_connection_info().addr()
            {
                return Err(fail(
                    "#insecure (no certificate check) is not supported: \
                     give the certificate authority with --redis-ca",
                ));
            }
            Ok(RedisTarget::Server {
                url: value.to_owned(),
                #[cfg(feature = "tls")]
                tls,
            })
        }
    }
}

/// Reads the TLS files if the URL asked for TLS.
#[cfg(feature = "tls")]
fn tls_for(over_tls: bool, options: &TlsOptions) -> Result<Tls, ConfigError> {
    over_tls.then(|| RedisTls::load(options)).transpose()
}

#[cfg(not(feature = "tls"))]
fn tls_for(_over_tls: bool, _options: &TlsOptions) -> Result<Tls, ConfigError> {
    Ok(())
}

/// The part of a Sentinel URL after `redis+sentinel://`.
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
fn sentinel_target(rest: &str, tls: Tls) -> Result<RedisTarget, String> {
    let (password, rest) = password_of(rest);
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (master, db) = path.split_once('/').unwrap_or((path, "0"));
    if master.is_empty() {
        return Err("a Sentinel URL names the master: redis+sentinel://HOST:PORT,…/MASTER".into());
    }
    let db = db
        .parse()
        .map_err(|_| format!("database {db:?} is not a number"))?;
    Ok(RedisTarget::Sentinel {
        sentinels: addresses(hosts, Some(26379), "sentinel")?,
        master: master.to_owned(),
        password,
        db,
        #[cfg(feature = "tls")]
        tls,
    })
}

/// The part of a Cluster URL after `redis+cluster://`: seed nodes, each
/// with its port (a cluster has one database, so there is no path).
#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
fn cluster_target(rest: &str, tls: Tls) -> Result<RedisTarget, String> {
    let (password, rest) = password_of(rest);
    let hosts = rest.strip_suffix('/').unwrap_or(rest);
    if hosts.contains('/') {
        return Err("a cluster has one database: redis+cluster://HOST:PORT,… has no path".into());
    }
    Ok(RedisTarget::Cluster {
        seeds: addresses(hosts, None, "seed node")?,
        password,
        #[cfg(feature = "tls")]
        tls,
    })
}

/// Splits `[[USER]:PASSWORD@]REST` (an empty password is none).
fn password_of(rest: &str) -> (Option<String>, &str) {
    match rest.rsplit_once('@') {
        Some((auth, rest)) => {
            let password = auth.split_once(':').map_or(auth, |(_, p)| p);
            (Some(password.to_owned()).filter(|p| !p.is_empty()), rest)
        }
        None => (None, rest),
    }
}

/// `HOST:PORT,HOST:PORT,…` as a list (a missing port is `default_port`,
/// if there is one); at least one.
fn addresses(hosts: &str, default_port: Option<u16>, what: &str) -> Result<Vec<String>, String> {
    let mut addresses = Vec::new();
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let address = match default_port {
            Some(port) if !host.contains(':') => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        let port_ok = address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("{what} {host:?} is not HOST:PORT"));
        }
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(format!("no {what} address"));
    }
    Ok(addresses)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_targets_like_the_original_and_urls() {
        let server = |url: &str| Some(RedisTarget::server(url));
        let redis_target = |value: &str| redis_target(value, &Default::default());
        assert_eq!(redis_target("localhost").ok(), server("redis://localhost"));
        assert_eq!(
            redis_target("10.1.2.3:6380").ok(),
            server("redis://10.1.2.3:6380")
        );
        assert_eq!(
            redis_target("redis://:pw@h:1/2").ok(),
            server("redis://:pw@h:1/2")
        );
        assert!(redis_target("").is_err());
        assert!(redis_target("http://x").is_err());
        assert!(redis_target("host:notaport").is_err());
    }

    #[test]
    #[cfg(not(feature = "redis-ha"))]
    fn sentinel_and_cluster_urls_name_the_feature_they_need() {
        let redis_target = |value: &str| redis_target(value, &Default::default());
        for url in ["redis+sentinel://a:1/m", "redis+cluster://a:1,b:2"] {
            let error = redis_target(url).unwrap_err().to_string();
            assert!(error.contains("`redis-ha` feature"), "{error}");
        }
    }

    #[test]
    #[cfg(feature = "redis-ha")]
    fn sentinel_urls_are_read() {
        let redis_target = |value: &str| redis_target(value, &Default::default());
        assert_eq!(
            redis_target("redis+sentinel://:pw@a:1,b:2,c/mymaster/3").ok(),
            Some(RedisTarget::Sentinel {
                sentinels: vec!["a:1".into(), "b:2".into(), "c:26379".into()],
                master: "mymaster".into(),
                password: Some("pw".into()),
                db: 3,
                #[cfg(feature = "tls")]
                tls: None,
            })
        );
        for bad in [
            "redis+sentinel://a:1",
            "redis+sentinel://a:1/",
            "redis+sentinel:///m",
            "redis+sentinel://a:x/m",
            "redis+sentinel://a:1/m/x",
        ] {
            assert!(redis_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(feature = "redis-ha")]
    fn cluster_urls_are_read() {
        let redis_target = |value: &str| redis_target(value, &Default::default());
        assert_eq!(
            redis_target("redis+cluster://:pw@a:1,b:2/").ok(),
            Some(RedisTarget::Cluster {
                seeds: vec!["a:1".into(), "b:2".into()],
                password: Some("pw".into()),
                #[cfg(feature = "tls")]
                tls: None,
            })
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://a",
            "redis+cluster://a:1/0",
            "redis+cluster://:7000",
            "redis+cluster://a:70000",
        ] {
            assert!(redis_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[cfg(not(feature = "tls"))]
    fn rediss_urls_name_the_feature_they_need() {
        for url in [
            "rediss://a:1",
            "rediss+sentinel://a:1/m",
            "rediss+cluster://a:1",
        ] {
            let error = redis_target(url, &()).unwrap_err().to_string();
            assert!(error.contains("`tls` feature"), "{error}");
        }
    }

    /// `rediss…` is `redis…` over TLS, with the files of `--redis-ca`
    /// (a CA made here).
    #[test]
    #[cfg(all(feature = "tls", feature = "redis-ha", target_os = "linux"))]
    fn rediss_urls_are_read() {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let file =
            std::env::temp_dir().join(format!("threadchat-config-ca-{}.pem", std::process::id()));
        std::fs::write(&file, ca.pem()).unwrap();
        let options = RedisTlsArgs {
            redis_ca: Some(file.clone()),
            ..RedisTlsArgs::default()
        };
        for (given, url) in [
            ("rediss://h:1/2", "rediss://h:1/2"),
            ("rediss+sentinel://a:1,b:2/m", "rediss+sentinel://a:1,b:2/m"),
            ("rediss+cluster://a:1,b:2", "rediss+cluster://a:1,b:2"),
        ] {
            let target = redis_target(given, &options).unwrap();
            assert!(target.tls().is_some(), "{given}");
            assert_eq!(target.url(), url);
        }
        assert!(
            redis_target("redis://h:1", &options)
                .unwrap()
                .tls()
                .is_none()
        );
        let _ = std::fs::remove_file(file);
    }
}
