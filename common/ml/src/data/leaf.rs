//! LEAF's federated datasets (Caldas et al. 2018) in their standard JSON
//! form: `{"users": [...], "num_samples": [...], "user_data": {user: {"x":
//! [...], "y": [...]}}}`, one or more files per split, optionally gzip'd.
//!
//! FEMNIST: 28x28 handwritten characters (62 classes: digits, upper and
//! lower case), one LEAF user per writer. Every example keeps its writer as
//! its owner, so the natural partition gives each client one writer's data.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{DataError, Dataset, Split};

/// FEMNIST's classes: 10 digits, 26 upper-case and 26 lower-case letters.
pub const FEMNIST_CLASSES: usize = 62;
/// FEMNIST's image side.
pub const FEMNIST_SIDE: usize = 28;
/// Folder of the LEAF FEMNIST files in the data directory.
pub const FEMNIST_DIR: &str = "leaf-femnist";

#[derive(Deserialize)]
struct LeafFile {
    users: Vec<String>,
    user_data: BTreeMap<String, UserData>,
}

#[derive(Deserialize)]
struct UserData {
    x: Vec<Vec<f32>>,
    y: Vec<u32>,
}

/// Loads `data_dir/leaf-femnist/{train,test}/*.json[.gz]`. Pixels are
/// inverted (LEAF stores 1.0 for the white background) so that ink is high,
/// as in MNIST. Train examples are owned by their writer; owner ids number
/// the writers in sorted order of their LEAF ids.
pub fn load_femnist(data_dir: &Path) -> Result<Split, DataError> {
    let root = data_dir.join(FEMNIST_DIR);
    let train = load_split(&root.join("train"))?;
    let test = load_split(&root.join("test"))?;
    Ok(Split {
        train: Arc::new(train),
        test: Arc::new(test),
    })
}

fn load_split(dir: &Path) -> Result<Dataset, DataError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| missing(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".json") || name.ends_with(".json.gz")
        })
        .collect();
    if files.is_empty() {
        return Err(missing(dir));
    }
    files.sort();
    // Writer id -> examples, merged across files, in sorted writer order.
    let mut writers: BTreeMap<String, UserData> = BTreeMap::new();
    for path in &files {
        let file = read_leaf(path)?;
        for user in file.users {
            let data = file
                .user_data
                .get(&user)
                .ok_or_else(|| bad(path, format!("user {user} listed without data")))?;
            if data.x.len() != data.y.len() {
                return Err(bad(
                    path,
                    format!(
                        "user {user}: {} images, {} labels",
                        data.x.len(),
                        data.y.len()
                    ),
                ));
            }
            let entry = writers.entry(user).or_insert(UserData {
                x: Vec::new(),
                y: Vec::new(),
            });
            entry.x.extend(data.x.iter().cloned());
            entry.y.extend(&data.y);
        }
    }
    let pixels = FEMNIST_SIDE * FEMNIST_SIDE;
    let total: usize = writers.values().map(|d| d.y.len()).sum();
    let mut features = Vec::with_capacity(total * pixels);
    let mut labels = Vec::with_capacity(total);
    let mut owners = Vec::with_capacity(total);
    for (owner, (user, data)) in writers.iter().enumerate() {
        for (x, &y) in data.x.iter().zip(&data.y) {
            if x.len() != pixels {
                return Err(bad(
                    dir,
                    format!(
                        "user {user}: an image of {} values, expected {pixels}",
                        x.len()
                    ),
                ));
            }
            if let Some(v) = x.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                return Err(bad(
                    dir,
                    format!("user {user}: pixel value {v} outside [0, 1]"),
                ));
            }
            if y as usize >= FEMNIST_CLASSES {
                return Err(bad(
                    dir,
                    format!("user {user}: label {y} >= {FEMNIST_CLASSES}"),
                ));
            }
            features.extend(x.iter().map(|v| 1.0 - v));
            labels.push(y);
            owners.push(owner as u32);
        }
    }
    Ok(Dataset {
        features,
        example_shape: vec![1, FEMNIST_SIDE, FEMNIST_SIDE],
        labels,
        num_classes: FEMNIST_CLASSES,
        targets: Vec::new(),
        class_names: Vec::new(),
        owners,
        vocab_size: 0,
    })
}

fn read_leaf(path: &Path) -> Result<LeafFile, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(path, format!("gzip: {e}")))?;
        out
    } else {
        raw
    };
    serde_json::from_slice(&text).map_err(|e| bad(path, format!("LEAF JSON: {e}")))
}

fn bad(path: &Path, reason: String) -> DataError {
    DataError::Invalid(format!("{}: {reason}", path.display()))
}

fn missing(dir: &Path) -> DataError {
    DataError::Missing {
        dataset: "femnist".into(),
        dir: dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(dir)
            .to_owned(),
        files: format!(
            "{FEMNIST_DIR}/train/*.json[.gz] and {FEMNIST_DIR}/test/*.json[.gz] (LEAF's preprocessing output)"
        ),
        hint: "; LEAF FEMNIST is not downloaded automatically".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Partition;

    fn write_leaf(dir: &Path, name: &str, users: &[(&str, &[u32])]) {
        std::fs::create_dir_all(dir).unwrap();
        let mut user_data = serde_json::Map::new();
        for (user, labels) in users {
            let x: Vec<Vec<f32>> = labels
                .iter()
                .map(|&l| vec![l as f32 / 100.0; FEMNIST_SIDE * FEMNIST_SIDE])
                .collect();
            user_data.insert(
                (*user).to_owned(),
                serde_json::json!({ "x": x, "y": labels }),
            );
        }
        let doc = serde_json::json!({
            "users": users.iter().map(|u| u.0).collect::<Vec<_>>(),
            "num_samples": users.iter().map(|u| u.1.len()).collect::<Vec<_>>(),
            "user_data": user_data,
        });
        let file = std::fs::File::create(dir.join(name)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, doc.to_string().as_bytes()).unwrap();
        gz.finish().unwrap();
    }

    #[test]
    fn writers_become_owners_and_the_natural_split_gives_one_each() {
        let root = std::env::temp_dir().join(format!("fedveil-leaf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join(FEMNIST_DIR);
        // Writer "b" spans two files; files are merged by writer.
        write_leaf(
            &dir.join("train"),
            "a.json.gz",
            &[("b", &[1, 2]), ("a", &[61])],
        );
        write_leaf(
            &dir.join("train"),
            "c.json.gz",
            &[("b", &[3]), ("c", &[0, 0, 5])],
        );
        write_leaf(&dir.join("test"), "t.json.gz", &[("a", &[7])]);
        let split = load_femnist(&root).unwrap();
        let train = &split.train;
        assert_eq!(train.len(), 7);
        assert_eq!(train.num_classes, 62);
        assert_eq!(train.labels, vec![61, 1, 2, 3, 0, 0, 5]);
        assert_eq!(train.owners, vec![0, 1, 1, 1, 2, 2, 2]);
        // Inverted: stored 0.61 becomes 0.39.
        assert!((train.example(0)[0] - 0.39).abs() < 1e-6);
        let parts = Partition::Natural.split_dataset(train, 3, 0).unwrap();
        let mut sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, 3, 3]);
        for part in &parts {
            let owner = train.owners[part[0]];
            assert!(part.iter().all(|&i| train.owners[i] == owner));
        }
        assert!(Partition::Natural.split_dataset(train, 4, 0).is_err());
        assert_eq!(split.test.len(), 1);
        // A bad label is named.
        write_leaf(&dir.join("test"), "u.json.gz", &[("z", &[99])]);
        let err = load_femnist(&root).unwrap_err().to_string();
        assert!(err.contains("label 99"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn real_femnist_when_available() {
        let Some(dir) = std::env::var_os(crate::data::DATA_DIR_ENV) else {
            eprintln!("FEDVEIL_DATA not set; skipping real FEMNIST check");
            return;
        };
        // The LEAF "small" sample in ../shared/data (see its PROVENANCE.md).
        let split = load_femnist(Path::new(&dir)).unwrap();
        assert_eq!(split.train.len(), 14_708);
        assert_eq!(split.test.len(), 4_088);
        let writers: std::collections::BTreeSet<u32> = split.train.owners.iter().copied().collect();
        assert_eq!(writers.len(), 105);
        let parts = Partition::Natural
            .split_dataset(&split.train, 105, 0)
            .unwrap();
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 14_708);
    }
}
