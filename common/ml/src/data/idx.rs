//! MNIST-style IDX files (`*-idx3-ubyte.gz` images, `*-idx1-ubyte.gz` labels).
//!
//! Files are checked against pinned SHA-256 sums before parsing, then the IDX
//! header (magic, dimensions, body length) is validated, so a truncated or
//! swapped file is reported as such rather than as a strange training curve.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use flate2::read::GzDecoder;

use super::fetch::{Fetch, sha256_file};
use super::{DataError, Dataset, Download, Split};

/// IDX magic for unsigned-byte data with `dims` dimensions.
const fn idx_magic(dims: u8) -> u32 {
    0x0000_0800 | dims as u32
}

/// One pinned file of a dataset.
#[derive(Debug, Clone, Copy)]
pub struct IdxFile {
    /// File name (gzip-compressed IDX).
    pub name: &'static str,
    /// Its pinned SHA-256, hex.
    pub sha256: &'static str,
}

/// An IDX dataset: where to fetch it and what its files must hash to.
#[derive(Debug, Clone, Copy)]
pub struct IdxDataset {
    /// The dataset's name.
    pub name: &'static str,
    /// Base URLs to fetch the files from, tried in order.
    pub mirrors: &'static [&'static str],
    /// Training images.
    pub train_images: IdxFile,
    /// Training labels.
    pub train_labels: IdxFile,
    /// Test images.
    pub test_images: IdxFile,
    /// Test labels.
    pub test_labels: IdxFile,
    /// Number of classes.
    pub num_classes: usize,
}

impl IdxDataset {
    /// The four files, training images first.
    pub fn files(&self) -> [IdxFile; 4] {
        [
            self.train_images,
            self.train_labels,
            self.test_images,
            self.test_labels,
        ]
    }
}

/// MNIST: handwritten digits, 60,000 training and 10,000 test images.
pub const MNIST: IdxDataset = IdxDataset {
    name: "mnist",
    mirrors: &[
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    train_images: IdxFile {
        name: "train-images-idx3-ubyte.gz",
        sha256: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    },
    train_labels: IdxFile {
        name: "train-labels-idx1-ubyte.gz",
        sha256: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    },
    test_images: IdxFile {
        name: "t10k-images-idx3-ubyte.gz",
        sha256: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    },
    test_labels: IdxFile {
        name: "t10k-labels-idx1-ubyte.gz",
        sha256: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    num_classes: 10,
};

/// Fashion-MNIST: clothing, in MNIST's format and sizes.
pub const FASHION_MNIST: IdxDataset = IdxDataset {
    name: "fashion-mnist",
    mirrors: &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    train_images: IdxFile {
        name: "train-images-idx3-ubyte.gz",
        sha256: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    },
    train_labels: IdxFile {
        name: "train-labels-idx1-ubyte.gz",
        sha256: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    },
    test_images: IdxFile {
        name: "t10k-images-idx3-ubyte.gz",
        sha256: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    },
    test_labels: IdxFile {
        name: "t10k-labels-idx1-ubyte.gz",
        sha256: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    num_classes: 10,
};

/// Ensures every file is present with the pinned checksum, fetching missing
/// ones when allowed, then parses both splits.
pub fn load_idx_dataset(
    spec: &IdxDataset,
    data_dir: &Path,
    download: Download,
) -> Result<Split, DataError> {
    let dir = data_dir.join(spec.name);
    let missing: Vec<IdxFile> = spec
        .files()
        .into_iter()
        .filter(|f| !dir.join(f.name).is_file())
        .collect();
    if !missing.is_empty() {
        let names = missing
            .iter()
            .map(|f| f.name)
            .collect::<Vec<_>>()
            .join(", ");
        let missing_error = |hint: String| DataError::Missing {
            dataset: spec.name.to_owned(),
            dir: dir.clone(),
            files: names.clone(),
            hint,
        };
        if download == Download::Never {
            return Err(missing_error(String::new()));
        }
        let fetch = Fetch::default();
        for file in &missing {
            if let Err(err) = fetch.from_mirrors(spec.mirrors, file.name, file.sha256, &dir) {
                return Err(missing_error(format!("; downloading failed: {err}")));
            }
        }
    }
    for file in spec.files() {
        let path = dir.join(file.name);
        let actual = sha256_file(&path)?;
        if actual != file.sha256 {
            return Err(DataError::Checksum {
                path,
                expected: file.sha256.to_owned(),
                actual,
            });
        }
    }
    let train = read_pair(&dir, spec.train_images, spec.train_labels, spec.num_classes)?;
    let test = read_pair(&dir, spec.test_images, spec.test_labels, spec.num_classes)?;
    Ok(Split {
        train: Arc::new(train),
        test: Arc::new(test),
    })
}

fn read_pair(
    dir: &Path,
    images: IdxFile,
    labels: IdxFile,
    num_classes: usize,
) -> Result<Dataset, DataError> {
    let images_path = dir.join(images.name);
    let labels_path = dir.join(labels.name);
    let (dims, pixels) = read_idx_gz(&images_path)?;
    let (label_dims, label_bytes) = read_idx_gz(&labels_path)?;
    let bad = |path: &Path, reason: String| DataError::BadIdx {
        path: path.to_owned(),
        reason,
    };
    if dims.len() != 3 {
        return Err(bad(
            &images_path,
            format!("expected 3 dimensions, found {dims:?}"),
        ));
    }
    if label_dims.len() != 1 {
        return Err(bad(
            &labels_path,
            format!("expected 1 dimension, found {label_dims:?}"),
        ));
    }
    if dims[0] != label_dims[0] {
        return Err(bad(
            &labels_path,
            format!("{} labels for {} images", label_dims[0], dims[0]),
        ));
    }
    if let Some(l) = label_bytes.iter().find(|&&l| l as usize >= num_classes) {
        return Err(bad(
            &labels_path,
            format!("label {l} out of range 0..{num_classes}"),
        ));
    }
    Ok(Dataset {
        features: pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
        example_shape: vec![1, dims[1], dims[2]],
        labels: label_bytes.into_iter().map(u32::from).collect(),
        num_classes,
        targets: Vec::new(),
        class_names: Vec::new(),
        owners: Vec::new(),
        vocab_size: 0,
    })
}

/// Reads a gzip'd unsigned-byte IDX file: its dimensions and its body.
pub fn read_idx_gz(path: &Path) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut raw = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut raw)
        .map_err(|e| DataError::BadIdx {
            path: path.to_owned(),
            reason: format!("gzip: {e}"),
        })?;
    parse_idx(&raw).map_err(|e| DataError::BadIdx {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Why a buffer is not an unsigned-byte IDX file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdxError {
    /// Shorter than the 4-byte magic.
    #[error("{0} bytes, too short for a header")]
    TooShort(usize),
    /// Not the unsigned-byte IDX magic.
    #[error("magic 0x{0:08x} is not unsigned-byte IDX (0x0000080N)")]
    BadMagic(u32),
    /// The dimensions are cut short.
    #[error("header is cut short")]
    HeaderCut,
    /// The dimensions' product overflows.
    #[error("dimensions overflow")]
    Overflow,
    /// The body's length does not match the dimensions.
    #[error("body has {have} bytes, dimensions {dims:?} need {need}")]
    BodySize {
        /// Bytes present.
        have: usize,
        /// The dimensions.
        dims: Vec<usize>,
        /// Bytes the dimensions need.
        need: usize,
    },
}

/// Parses an unsigned-byte IDX buffer.
pub fn parse_idx(raw: &[u8]) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    if raw.len() < 4 {
        return Err(IdxError::TooShort(raw.len()));
    }
    let magic = u32::from_be_bytes(raw[0..4].try_into().expect("4 bytes"));
    let ndims = raw[3];
    if ndims == 0 || magic != idx_magic(ndims) {
        return Err(IdxError::BadMagic(magic));
    }
    let header_len = 4 + 4 * ndims as usize;
    if raw.len() < header_len {
        return Err(IdxError::HeaderCut);
    }
    let dims: Vec<usize> = raw[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(IdxError::Overflow)?;
    let body = &raw[header_len..];
    if body.len() != expected {
        return Err(IdxError::BodySize {
            have: body.len(),
            dims,
            need: expected,
        });
    }
    Ok((dims, body.to_vec()))
}

/// Encodes an unsigned-byte IDX buffer (for tests and synthetic fixtures).
pub fn encode_idx(dims: &[usize], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_round_trip() {
        let body: Vec<u8> = (0..24).collect();
        let raw = encode_idx(&[2, 3, 4], &body);
        assert_eq!(parse_idx(&raw).unwrap(), (vec![2, 3, 4], body));
    }

    #[test]
    fn idx_rejects_bad_magic_and_short_body() {
        assert_eq!(
            parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 5]),
            Err(IdxError::BadMagic(0x0000_0d01))
        );
        let raw = encode_idx(&[2, 3], &[0; 5]);
        assert!(matches!(
            parse_idx(&raw).unwrap_err(),
            IdxError::BodySize { need: 6, .. }
        ));
    }

    #[test]
    fn missing_files_say_what_to_put_where() {
        let dir = std::env::temp_dir().join(format!("fedveil-missing-{}", std::process::id()));
        let err = load_idx_dataset(&MNIST, &dir, Download::Never).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("train-images-idx3-ubyte.gz"), "{msg}");
        assert!(
            msg.contains(&dir.join("mnist").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("FEDVEIL_DATA"), "{msg}");
    }

    #[test]
    fn corrupt_file_is_a_checksum_error() {
        let dir = std::env::temp_dir().join(format!("fedveil-corrupt-{}", std::process::id()));
        let sub = dir.join("mnist");
        std::fs::create_dir_all(&sub).unwrap();
        for f in MNIST.files() {
            std::fs::write(sub.join(f.name), b"not mnist").unwrap();
        }
        let err = load_idx_dataset(&MNIST, &dir, Download::Never).unwrap_err();
        assert!(matches!(err, DataError::Checksum { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Runs on the real files when `FEDVEIL_DATA` points at them.
    #[test]
    fn real_mnist_when_available() {
        let Some(dir) = std::env::var_os(super::super::DATA_DIR_ENV) else {
            eprintln!("FEDVEIL_DATA not set; skipping real MNIST check");
            return;
        };
        let split = load_idx_dataset(&MNIST, Path::new(&dir), Download::Never).unwrap();
        assert_eq!(split.train.len(), 60_000);
        assert_eq!(split.test.len(), 10_000);
        assert_eq!(split.train.example_shape, vec![1, 28, 28]);
        assert_eq!(
            split.test.class_counts(),
            vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
        );
        let f = load_idx_dataset(&FASHION_MNIST, Path::new(&dir), Download::Never).unwrap();
        assert_eq!(f.train.class_counts(), vec![6000; 10]);
    }
}
