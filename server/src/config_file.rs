//! `server.toml`: the settings `fedveil-server init` writes next to the CA
//! and that the other commands read, so an operator states them once.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use fedveil_net::pki;
use serde::{Deserialize, Serialize};

/// File name inside the server directory.
pub const SERVER_CONFIG_FILE: &str = "server.toml";
/// Port `fedveil-server run` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 4433;

/// Why `server.toml` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's content is invalid.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

/// The contents of `server.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// UDP address `fedveil-server run` listens on.
    pub listen: SocketAddr,
    /// DNS names and IP addresses in the server certificate.
    pub names: Vec<String>,
    /// Lifetime of the client certificates enrolment issues.
    pub client_cert_ttl: String,
    /// Default lifetime of enrolment tokens.
    pub token_ttl: String,
}

impl ServerFile {
    /// Defaults for a server reachable as `names`: it listens on loopback
    /// only when every name is a loopback name.
    pub fn new(names: &[String]) -> Self {
        let loopback_only = names
            .iter()
            .all(|n| n == "localhost" || n.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()));
        let host: IpAddr = if loopback_only {
            [127, 0, 0, 1].into()
        } else {
            [0, 0, 0, 0].into()
        };
        Self {
            listen: SocketAddr::new(host, DEFAULT_PORT),
            names: names.to_vec(),
            client_cert_ttl: pki::format_duration(pki::DEFAULT_CLIENT_CERT_TTL),
            token_ttl: pki::format_duration(pki::DEFAULT_TOKEN_TTL),
        }
    }

    /// The file in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, ConfigFileError> {
        let path = dir.join(SERVER_CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ConfigFileError::Io { path, source }),
        };
        let file: Self = toml::from_str(&text).map_err(|e| ConfigFileError::Invalid {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        for ttl in [&file.client_cert_ttl, &file.token_ttl] {
            pki::parse_duration(ttl).map_err(|e| ConfigFileError::Invalid {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(Some(file))
    }

    /// Writes the file with a comment on each setting.
    pub fn save(&self, dir: &Path) -> Result<(), ConfigFileError> {
        let path = dir.join(SERVER_CONFIG_FILE);
        let names: Vec<String> = self.names.iter().map(|n| format!("{n:?}")).collect();
        let text = format!(
            "# fedveil server settings (written by `fedveil-server init`).\n\
             \n\
             # UDP address `fedveil-server run` listens on (--listen overrides).\n\
             listen = \"{}\"\n\
             # Names in the server certificate; nodes must dial one of them.\n\
             # Changing them needs a new certificate: run init in a new directory.\n\
             names = [{}]\n\
             # Lifetime of client certificates; nodes renew in the last third.\n\
             client_cert_ttl = \"{}\"\n\
             # Default lifetime of enrolment tokens (`enroll --ttl` overrides).\n\
             token_ttl = \"{}\"\n",
            self.listen,
            names.join(", "),
            self.client_cert_ttl,
            self.token_ttl
        );
        std::fs::write(&path, text).map_err(|source| ConfigFileError::Io { path, source })
    }

    /// Lifetime of the client certificates enrolment issues.
    pub fn client_cert_ttl(&self) -> Duration {
        pki::parse_duration(&self.client_cert_ttl).expect("validated on load")
    }

    /// Default lifetime of enrolment tokens.
    pub fn token_ttl(&self) -> Duration {
        pki::parse_duration(&self.token_ttl).expect("validated on load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_file_reads_back_and_listens_where_reachable() {
        let dir = std::env::temp_dir().join(format!("fedveil-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let local = ServerFile::new(&["localhost".into(), "127.0.0.1".into()]);
        assert!(local.listen.ip().is_loopback());
        let public = ServerFile::new(&["fl.example.org".into(), "10.0.0.5".into()]);
        assert!(public.listen.ip().is_unspecified());
        public.save(&dir).unwrap();
        let back = ServerFile::load(&dir).unwrap().unwrap();
        assert_eq!(back, public);
        assert_eq!(back.client_cert_ttl(), pki::DEFAULT_CLIENT_CERT_TTL);
        std::fs::write(dir.join(SERVER_CONFIG_FILE), "listen = 3\n").unwrap();
        assert!(ServerFile::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(ServerFile::load(&dir).unwrap(), None);
    }
}
