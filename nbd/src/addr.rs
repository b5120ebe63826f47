//! NBD URIs (the subset of https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md
//! that plain connections use): `nbd://host[:port][/export]` and
//! `nbd+unix:///[export]?socket=/path`.

use std::path::PathBuf;

/// The default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix { socket: PathBuf },
}

/// A parsed NBD URI: the server and the export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "NBD URI {uri:?}: {why} (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
)]
pub struct UriError {
    pub uri: String,
    pub why: String,
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let err = |why: &str| UriError {
            uri: uri.to_string(),
            why: why.to_string(),
        };
        let u = url::Url::parse(uri).map_err(|e| err(&e.to_string()))?;
        let export = percent_encoding::percent_decode_str(u.path().trim_start_matches('/'))
            .decode_utf8()
            .map_err(|_| err("export name is not UTF-8"))?
            .into_owned();
        if export.len() > 4096 {
            return Err(err("export name longer than 4096 bytes"));
        }
        let mut socket = None;
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "socket" => socket = Some(PathBuf::from(v.as_ref())),
                other => return Err(err(&format!("unsupported query parameter {other:?}"))),
            }
        }
        let address = match u.scheme() {
            "nbd" => {
                if socket.is_some() {
                    return Err(err("socket= is for nbd+unix://"));
                }
                let host = u
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| err("no host"))?;
                Address::Tcp {
                    host: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    port: u.port().unwrap_or(DEFAULT_PORT),
                }
            }
            "nbd+unix" => {
                if u.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(err("nbd+unix:// takes no host"));
                }
                Address::Unix {
                    socket: socket.ok_or_else(|| err("no socket= parameter"))?,
                }
            }
            "nbds" | "nbds+unix" => return Err(err("TLS (nbds) is not supported")),
            _ => return Err(err("scheme must be nbd or nbd+unix")),
        };
        Ok(Self { address, export })
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.address {
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Address::Unix { socket } => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, socket.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        let u = NbdUri::parse("nbd://127.0.0.1:10900/disk0").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "disk0");
        let u = NbdUri::parse("nbd://server").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "server".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///?socket=/run/q.sock").unwrap();
        assert_eq!(
            u.address,
            Address::Unix {
                socket: "/run/q.sock".into()
            }
        );
        let u = NbdUri::parse("nbd+unix:///my%20disk?socket=/tmp/s").unwrap();
        assert_eq!(u.export, "my disk");
        let u = NbdUri::parse("nbd://[::1]:5000/x").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: 5000
            }
        );
    }

    #[test]
    fn rejects_what_it_cannot_do() {
        for (uri, want) in [
            ("http://x/y", "scheme"),
            ("nbds://x/y", "TLS"),
            ("nbd+unix:///x", "socket="),
            ("nbd://x/y?socket=/s", "socket= is for"),
            ("nbd+unix://host/x?socket=/s", "no host"),
            ("nbd:///x", "no host"),
            ("nbd://x/y?tls=on", "unsupported query"),
            ("not a uri", "expected nbd://"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(want), "{uri}: {e}");
        }
    }
}
