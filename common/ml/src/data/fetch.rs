//! Downloading dataset files: pinned SHA-256, atomic rename, bounded size.
//!
//! A file is written to `NAME.part`, hashed while it streams, and renamed into
//! place only if the hash matches, so an interrupted or tampered download
//! never looks like a dataset.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::DataError;

/// Largest file we are willing to download (the largest pinned file is 26 MB).
pub const MAX_DOWNLOAD_BYTES: u64 = 256 * 1024 * 1024;
/// Give up on a mirror that does not answer in this time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Give up on a download that takes longer than this.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Download settings.
#[derive(Debug, Clone)]
pub struct Fetch {
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long the whole download may take.
    pub timeout: Duration,
    /// The most bytes accepted; a larger file is refused.
    pub max_bytes: u64,
}

impl Default for Fetch {
    fn default() -> Self {
        Self {
            connect_timeout: CONNECT_TIMEOUT,
            timeout: DOWNLOAD_TIMEOUT,
            max_bytes: MAX_DOWNLOAD_BYTES,
        }
    }
}

impl Fetch {
    /// Tries each mirror in turn; returns the last error if all fail.
    pub fn from_mirrors(
        &self,
        mirrors: &[&str],
        name: &str,
        sha256: &str,
        dir: &Path,
    ) -> Result<(), DataError> {
        let mut last = None;
        for mirror in mirrors {
            let url = format!("{mirror}{name}");
            match self.file(&url, sha256, &dir.join(name)) {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::warn!(%url, %err, "mirror failed");
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| DataError::Invalid("no mirrors configured".into())))
    }

    /// Downloads `url` to `dest` if its SHA-256 equals `sha256` (hex).
    pub fn file(&self, url: &str, sha256: &str, dest: &Path) -> Result<(), DataError> {
        let fail = |reason: String| DataError::Download {
            url: url.to_owned(),
            reason,
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(self.connect_timeout))
            .timeout_global(Some(self.timeout))
            .build()
            .into();
        let mut response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
        let mut reader = response
            .body_mut()
            .with_config()
            .limit(self.max_bytes)
            .reader();
        let part = dest.with_extension("part");
        let mut out = std::fs::File::create(&part).map_err(|e| DataError::io(&part, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| DataError::io(&part, e))?;
        }
        out.sync_all().map_err(|e| DataError::io(&part, e))?;
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(DataError::Checksum {
                path: dest.to_owned(),
                expected: sha256.to_owned(),
                actual,
            });
        }
        std::fs::rename(&part, dest).map_err(|e| DataError::io(dest, e))?;
        Ok(())
    }
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves `body` once over plain HTTP on loopback; returns the URL.
    fn serve_once(body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = stream.read(&mut req);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body).unwrap();
        });
        format!("http://{addr}/file.gz")
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fedveil-fetch-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn downloads_and_verifies() {
        let body = b"pretend this is mnist".to_vec();
        let sha = hex::encode(Sha256::digest(&body));
        let dir = temp_dir("ok");
        let dest = dir.join("file.gz");
        Fetch::default()
            .file(&serve_once(body.clone()), &sha, &dest)
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(sha256_file(&dest).unwrap(), sha);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_a_file_with_the_wrong_hash() {
        let dir = temp_dir("bad");
        let dest = dir.join("file.gz");
        let err = Fetch::default()
            .file(&serve_once(b"tampered".to_vec()), &"0".repeat(64), &dest)
            .unwrap_err();
        assert!(matches!(err, DataError::Checksum { .. }), "{err}");
        assert!(!dest.exists() && !dest.with_extension("part").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unreachable_mirror_is_a_download_error() {
        // Port 1 on loopback refuses connections at once.
        let err = Fetch::default()
            .file(
                "http://127.0.0.1:1/x.gz",
                &"0".repeat(64),
                &temp_dir("down").join("x.gz"),
            )
            .unwrap_err();
        assert!(matches!(err, DataError::Download { .. }), "{err}");
    }
}
