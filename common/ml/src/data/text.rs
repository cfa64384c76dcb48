//! Text datasets in their standard formats, tokenized into fixed-length
//! sequences of token ids (stored as exact `f32`s in [`Dataset::features`],
//! id [`PAD`] = 0 for padding, [`UNK`] = 1 for out-of-vocabulary).
//!
//! - `sst2/`: GLUE SST-2 TSV (`sentence<TAB>label`, header); the labelled
//!   dev split is the test set (GLUE's test labels are hidden).
//! - `ag-news/`: TSV `text<TAB>label-name`, no header; `dev.tsv` trains,
//!   `test.tsv` tests.
//! - `tiny-shakespeare/input.txt`: plain text; the first 90% trains, the
//!   rest tests; examples are windows of [`SHAKESPEARE_SEQ_LEN`] characters
//!   labelled with the next character.
//! - `leaf-shakespeare/`: LEAF JSON, 80-character strings and the next
//!   character, one user per speaking role (the natural partition).
//! - `shakespeare-roles`: LEAF's per-role raw text
//!   (`leaf-shakespeare/by_play_and_character.json`, `{role: text}`), cut
//!   into windows like Tiny Shakespeare, one owner per role with enough
//!   text: hundreds of naturally non-IID clients instead of LEAF's sample
//!   of 10.
//!
//! Vocabularies come from the training split only, so test text never
//! leaks into the model's inputs; word vocabularies are ordered by count,
//! then alphabetically, so every node builds the same one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{DataError, Dataset, Split};

/// Padding token id.
pub const PAD: u32 = 0;
/// Out-of-vocabulary token id.
pub const UNK: u32 = 1;
/// Tokens per example for sentence classification.
pub const DEFAULT_SEQ_LEN: usize = 64;
/// Characters per example for next-character prediction (LEAF's length).
pub const SHAKESPEARE_SEQ_LEN: usize = 80;
/// Largest word vocabulary (most frequent words, plus PAD and UNK).
pub const DEFAULT_MAX_VOCAB: usize = 20_000;
/// Words seen fewer times than this in training map to UNK.
pub const MIN_WORD_COUNT: usize = 2;
/// Tiny Shakespeare: characters between consecutive training windows.
pub const TINY_SHAKESPEARE_STRIDE: usize = 10;
/// Tiny Shakespeare: fraction of the text (the end) held out for testing.
pub const TINY_SHAKESPEARE_TEST_FRACTION: f64 = 0.1;
/// Shakespeare roles: characters between consecutive windows.
pub const SHAKESPEARE_ROLES_STRIDE: usize = 10;
/// Shakespeare roles: fraction of each role's text (the end) held out.
pub const SHAKESPEARE_ROLES_TEST_FRACTION: f64 = 0.1;
/// Shakespeare roles: roles with fewer training windows are left out
/// (LEAF keeps users with at least 64 samples).
pub const SHAKESPEARE_ROLES_MIN_WINDOWS: usize = 64;
/// Shakespeare roles: the per-role text file, in [`LEAF_SHAKESPEARE_DIR`].
pub const SHAKESPEARE_ROLES_FILE: &str = "by_play_and_character.json";
/// AG News classes, in label order.
pub const AG_NEWS_CLASSES: [&str; 4] = ["World", "Sports", "Business", "Sci/Tech"];

/// Folders in the data directory.
pub const SST2_DIR: &str = "sst2";
/// AG News's folder in the data directory.
pub const AG_NEWS_DIR: &str = "ag-news";
/// Tiny Shakespeare's folder in the data directory.
pub const TINY_SHAKESPEARE_DIR: &str = "tiny-shakespeare";
/// LEAF Shakespeare's folder in the data directory.
pub const LEAF_SHAKESPEARE_DIR: &str = "leaf-shakespeare";

fn malformed(path: &Path, line: usize, reason: impl Into<String>) -> DataError {
    DataError::Malformed {
        path: path.to_owned(),
        line,
        reason: reason.into(),
    }
}

fn missing(dir: &Path, dataset: &str, files: &str) -> DataError {
    DataError::Missing {
        dataset: dataset.to_owned(),
        dir: dir.to_owned(),
        files: files.to_owned(),
        hint: String::new(),
    }
}

fn read_text(path: &Path, dataset: &str) -> Result<String, DataError> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| {
            DataError::Invalid(format!(
                "{}: not UTF-8 (byte {})",
                path.display(),
                e.utf8_error().valid_up_to()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing(
            path.parent().and_then(Path::parent).unwrap_or(path),
            dataset,
            &format!(
                "{dataset}/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        )),
        Err(e) => Err(DataError::io(path, e)),
    }
}

/// Lower-cased words: runs of letters, digits and apostrophes.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty() && *w != "'")
        .map(str::to_lowercase)
}

/// A word-level vocabulary built from training text.
#[derive(Debug, Clone, PartialEq)]
pub struct WordVocab {
    ids: HashMap<String, u32>,
}

impl WordVocab {
    /// The `max_size - 2` most frequent words seen at least `min_count`
    /// times (ties broken alphabetically), after PAD and UNK.
    pub fn build<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        max_size: usize,
        min_count: usize,
    ) -> Self {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for t in texts {
            for w in words(t) {
                *counts.entry(w).or_default() += 1;
            }
        }
        let mut ranked: Vec<(String, usize)> = counts
            .into_iter()
            .filter(|&(_, c)| c >= min_count)
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(max_size.saturating_sub(2));
        let ids = ranked
            .into_iter()
            .enumerate()
            .map(|(i, (w, _))| (w, i as u32 + 2))
            .collect();
        Self { ids }
    }

    /// Token count, PAD and UNK included.
    pub fn len(&self) -> usize {
        self.ids.len() + 2
    }

    /// Always false: PAD and UNK are always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `text` as exactly `seq_len` ids: truncated, then padded with PAD.
    pub fn encode(&self, text: &str, seq_len: usize) -> Vec<f32> {
        let mut out: Vec<f32> = words(text)
            .take(seq_len)
            .map(|w| *self.ids.get(&w).unwrap_or(&UNK) as f32)
            .collect();
        out.resize(seq_len, PAD as f32);
        out
    }
}

/// A character vocabulary built from training text (sorted characters).
#[derive(Debug, Clone, PartialEq)]
pub struct CharVocab {
    ids: BTreeMap<char, u32>,
}

impl CharVocab {
    /// The distinct characters of `texts`, in sorted order, after PAD and UNK.
    pub fn build<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut chars: Vec<char> = texts.into_iter().flat_map(str::chars).collect();
        chars.sort_unstable();
        chars.dedup();
        Self {
            ids: chars
                .into_iter()
                .enumerate()
                .map(|(i, c)| (c, i as u32 + 2))
                .collect(),
        }
    }

    /// Number of ids, reserved ones included.
    pub fn len(&self) -> usize {
        self.ids.len() + 2
    }

    /// Always false: PAD and UNK are always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The id of `c` (the unknown id for a character not seen).
    pub fn id(&self, c: char) -> u32 {
        *self.ids.get(&c).unwrap_or(&UNK)
    }
}

/// One labelled sentence from a TSV file.
struct Row {
    text: String,
    label: u32,
}

/// Reads `text<TAB>label` lines; `header` is the exact first line if the
/// format has one; `label` maps the label field (None: malformed).
fn read_tsv(
    path: &Path,
    dataset: &str,
    header: Option<&str>,
    label: impl Fn(&str) -> Option<u32>,
) -> Result<Vec<Row>, DataError> {
    let text = read_text(path, dataset)?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    if let Some(want) = header {
        match lines.next() {
            Some((_, got)) if got.trim_end() == want => {}
            Some((n, got)) => {
                return Err(malformed(
                    path,
                    n,
                    format!("expected the header {want:?}, got {got:?}"),
                ));
            }
            None => return Err(malformed(path, 1, "empty file")),
        }
    }
    let mut rows = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [text, raw_label] = fields[..] else {
            return Err(malformed(
                path,
                n,
                format!("expected 2 tab-separated fields, found {}", fields.len()),
            ));
        };
        let label = label(raw_label.trim())
            .ok_or_else(|| malformed(path, n, format!("unknown label {raw_label:?}")))?;
        rows.push(Row {
            text: text.to_owned(),
            label,
        });
    }
    if rows.is_empty() {
        return Err(malformed(path, 1, "no examples"));
    }
    Ok(rows)
}

fn sentence_split(train: Vec<Row>, test: Vec<Row>, num_classes: usize, seq_len: usize) -> Split {
    let vocab = WordVocab::build(
        train.iter().map(|r| r.text.as_str()),
        DEFAULT_MAX_VOCAB,
        MIN_WORD_COUNT,
    );
    let encode = |rows: &[Row]| Dataset {
        features: rows
            .iter()
            .flat_map(|r| vocab.encode(&r.text, seq_len))
            .collect(),
        example_shape: vec![seq_len],
        labels: rows.iter().map(|r| r.label).collect(),
        num_classes,
        targets: Vec::new(),
        class_names: Vec::new(),
        owners: Vec::new(),
        vocab_size: vocab.len(),
    };
    Split {
        train: Arc::new(encode(&train)),
        test: Arc::new(encode(&test)),
    }
}

/// GLUE SST-2: `sst2/train.tsv` trains, `sst2/dev.tsv` tests.
pub fn load_sst2(data_dir: &Path) -> Result<Split, DataError> {
    let dir = data_dir.join(SST2_DIR);
    let label = |s: &str| match s {
        "0" => Some(0),
        "1" => Some(1),
        _ => None,
    };
    let read = |f: &str| read_tsv(&dir.join(f), SST2_DIR, Some("sentence\tlabel"), label);
    Ok(sentence_split(
        read("train.tsv")?,
        read("dev.tsv")?,
        2,
        DEFAULT_SEQ_LEN,
    ))
}

/// AG News: `ag-news/dev.tsv` trains, `ag-news/test.tsv` tests.
pub fn load_ag_news(data_dir: &Path) -> Result<Split, DataError> {
    let dir = data_dir.join(AG_NEWS_DIR);
    let label = |s: &str| {
        AG_NEWS_CLASSES
            .iter()
            .position(|&c| c == s)
            .map(|i| i as u32)
    };
    let read = |f: &str| read_tsv(&dir.join(f), AG_NEWS_DIR, None, label);
    Ok(sentence_split(
        read("dev.tsv")?,
        read("test.tsv")?,
        AG_NEWS_CLASSES.len(),
        DEFAULT_SEQ_LEN,
    ))
}

/// Next-character examples: each window of `seq_len` ids, labelled with
/// the id that follows it.
fn char_windows(ids: &[u32], seq_len: usize, stride: usize, vocab: usize) -> Dataset {
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut start = 0;
    while start + seq_len < ids.len() {
        features.extend(ids[start..start + seq_len].iter().map(|&i| i as f32));
        labels.push(ids[start + seq_len]);
        start += stride;
    }
    Dataset {
        features,
        example_shape: vec![seq_len],
        labels,
        num_classes: vocab,
        targets: Vec::new(),
        class_names: Vec::new(),
        owners: Vec::new(),
        vocab_size: vocab,
    }
}

/// Tiny Shakespeare: windows over the first 90% train, the rest test.
pub fn load_tiny_shakespeare(data_dir: &Path) -> Result<Split, DataError> {
    let path = data_dir.join(TINY_SHAKESPEARE_DIR).join("input.txt");
    let text = read_text(&path, TINY_SHAKESPEARE_DIR)?;
    let chars: Vec<char> = text.chars().collect();
    let cut = ((1.0 - TINY_SHAKESPEARE_TEST_FRACTION) * chars.len() as f64) as usize;
    if cut <= SHAKESPEARE_SEQ_LEN || chars.len() - cut <= SHAKESPEARE_SEQ_LEN {
        return Err(malformed(
            &path,
            1,
            format!("{} characters is too short", chars.len()),
        ));
    }
    let train_text: String = chars[..cut].iter().collect();
    let vocab = CharVocab::build([train_text.as_str()]);
    let ids: Vec<u32> = chars.iter().map(|&c| vocab.id(c)).collect();
    let (train, test) = ids.split_at(cut);
    Ok(Split {
        train: Arc::new(char_windows(
            train,
            SHAKESPEARE_SEQ_LEN,
            TINY_SHAKESPEARE_STRIDE,
            vocab.len(),
        )),
        test: Arc::new(char_windows(
            test,
            SHAKESPEARE_SEQ_LEN,
            SHAKESPEARE_SEQ_LEN,
            vocab.len(),
        )),
    })
}

#[derive(Deserialize)]
struct LeafTextFile {
    users: Vec<String>,
    user_data: BTreeMap<String, LeafTextUser>,
}

#[derive(Deserialize)]
struct LeafTextUser {
    x: Vec<String>,
    y: Vec<String>,
}

fn leaf_file(dir: &Path, part: &str) -> Result<PathBuf, DataError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| {
            missing(
                dir.parent().unwrap_or(dir),
                LEAF_SHAKESPEARE_DIR,
                &format!("{LEAF_SHAKESPEARE_DIR}/all_data_*_train_*.json and *_test_*.json (LEAF's output)"),
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".json") && n.contains(&format!("_{part}_"))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(missing(
            dir.parent().unwrap_or(dir),
            LEAF_SHAKESPEARE_DIR,
            &format!("{LEAF_SHAKESPEARE_DIR}/all_data_*_{part}_*.json (LEAF's output)"),
        )),
        n => Err(DataError::Invalid(format!(
            "{}: {n} LEAF {part} files; keep one",
            dir.display()
        ))),
    }
}

fn read_leaf_text(path: &Path) -> Result<Vec<(String, LeafTextUser)>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut file: LeafTextFile = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(path, e.line(), format!("LEAF JSON: {e}")))?;
    let mut out = Vec::new();
    for user in file.users {
        let data = file.user_data.remove(&user).ok_or_else(|| {
            DataError::Invalid(format!("{}: user {user} has no data", path.display()))
        })?;
        if data.x.len() != data.y.len() {
            return Err(DataError::Invalid(format!(
                "{}: user {user} has {} inputs and {} targets",
                path.display(),
                data.x.len(),
                data.y.len()
            )));
        }
        out.push((user, data));
    }
    Ok(out)
}

/// LEAF Shakespeare: one owner per speaking role (sorted by role name).
pub fn load_leaf_shakespeare(data_dir: &Path) -> Result<Split, DataError> {
    let dir = data_dir.join(LEAF_SHAKESPEARE_DIR);
    let train_path = leaf_file(&dir, "train")?;
    let test_path = leaf_file(&dir, "test")?;
    let mut train = read_leaf_text(&train_path)?;
    let mut test = read_leaf_text(&test_path)?;
    train.sort_by(|a, b| a.0.cmp(&b.0));
    test.sort_by(|a, b| a.0.cmp(&b.0));
    let vocab = CharVocab::build(
        train
            .iter()
            .flat_map(|(_, d)| d.x.iter().chain(&d.y).map(String::as_str)),
    );
    let encode = |users: &[(String, LeafTextUser)], path: &Path, owned: bool| {
        let mut ds = Dataset {
            features: Vec::new(),
            example_shape: vec![SHAKESPEARE_SEQ_LEN],
            labels: Vec::new(),
            num_classes: vocab.len(),
            targets: Vec::new(),
            class_names: Vec::new(),
            owners: Vec::new(),
            vocab_size: vocab.len(),
        };
        for (owner, (user, data)) in users.iter().enumerate() {
            for (i, (x, y)) in data.x.iter().zip(&data.y).enumerate() {
                let xs: Vec<char> = x.chars().collect();
                let mut ys = y.chars();
                let (Some(next), None) = (ys.next(), ys.next()) else {
                    return Err(DataError::Invalid(format!(
                        "{}: user {user}, sample {i}: the target must be one character, got {y:?}",
                        path.display()
                    )));
                };
                if xs.len() != SHAKESPEARE_SEQ_LEN {
                    return Err(DataError::Invalid(format!(
                        "{}: user {user}, sample {i}: {} characters, expected {SHAKESPEARE_SEQ_LEN}",
                        path.display(),
                        xs.len()
                    )));
                }
                ds.features.extend(xs.iter().map(|&c| vocab.id(c) as f32));
                ds.labels.push(vocab.id(next));
                if owned {
                    ds.owners.push(owner as u32);
                }
            }
        }
        Ok(ds)
    };
    Ok(Split {
        train: Arc::new(encode(&train, &train_path, true)?),
        test: Arc::new(encode(&test, &test_path, false)?),
    })
}

/// Shakespeare by role from LEAF's raw per-role text: each role's text
/// is split by position (the last tenth tests, so no test window overlaps
/// a training one), cut into windows of [`SHAKESPEARE_SEQ_LEN`] characters
/// every [`SHAKESPEARE_ROLES_STRIDE`], and owned by its role (sorted by
/// name). Roles with fewer than [`SHAKESPEARE_ROLES_MIN_WINDOWS`] training
/// windows are left out.
pub fn load_shakespeare_roles(data_dir: &Path) -> Result<Split, DataError> {
    let path = data_dir
        .join(LEAF_SHAKESPEARE_DIR)
        .join(SHAKESPEARE_ROLES_FILE);
    let text = read_text(&path, LEAF_SHAKESPEARE_DIR)?;
    let roles: BTreeMap<String, String> = serde_json::from_str(&text)
        .map_err(|e| malformed(&path, e.line(), format!("expected {{role: text}}: {e}")))?;
    let min_chars = SHAKESPEARE_SEQ_LEN + SHAKESPEARE_ROLES_STRIDE * SHAKESPEARE_ROLES_MIN_WINDOWS;
    let parts: Vec<(Vec<char>, usize)> = roles
        .values()
        .map(|t| {
            let chars: Vec<char> = t.chars().collect();
            let cut = ((1.0 - SHAKESPEARE_ROLES_TEST_FRACTION) * chars.len() as f64) as usize;
            (chars, cut)
        })
        .filter(|(_, cut)| *cut >= min_chars)
        .collect();
    if parts.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: no role has the {min_chars} characters of training text it takes to be a client",
            path.display()
        )));
    }
    let train_text: Vec<String> = parts
        .iter()
        .map(|(chars, cut)| chars[..*cut].iter().collect())
        .collect();
    let vocab = CharVocab::build(train_text.iter().map(String::as_str));
    let mut train = char_windows(&[], SHAKESPEARE_SEQ_LEN, 1, vocab.len());
    let mut test = train.clone();
    for (owner, (chars, cut)) in parts.iter().enumerate() {
        let ids: Vec<u32> = chars.iter().map(|&c| vocab.id(c)).collect();
        let (a, b) = ids.split_at(*cut);
        let role_train = char_windows(
            a,
            SHAKESPEARE_SEQ_LEN,
            SHAKESPEARE_ROLES_STRIDE,
            vocab.len(),
        );
        let role_test = char_windows(
            b,
            SHAKESPEARE_SEQ_LEN,
            SHAKESPEARE_ROLES_STRIDE,
            vocab.len(),
        );
        train
            .owners
            .extend(std::iter::repeat_n(owner as u32, role_train.len()));
        train.features.extend(role_train.features);
        train.labels.extend(role_train.labels);
        test.features.extend(role_test.features);
        test.labels.extend(role_test.labels);
    }
    Ok(Split {
        train: Arc::new(train),
        test: Arc::new(test),
    })
}

#[cfg(test)]
mod tests;
