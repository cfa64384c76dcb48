//! CSV tables as datasets: a header row, numeric feature columns and one
//! label column, chosen by name: a class for a classification, a number
//! for a regression.
//!
//! Class labels are numbered the same way on every party, or the models
//! would disagree on what an output means: labels that are names map to
//! the position of the name in the class list the settings give (the same
//! list on the server and every node); whole-number labels are class ids
//! as they are. Anything else in a cell is refused with its file, line and
//! column.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Task};

/// Which column holds the label, what it means, and the class names in
/// their order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CsvSpec {
    /// Name of the label column.
    pub label: String,
    /// Class names in id order, when labels are names; with whole-number
    /// labels, the number of names is the number of classes. Not for a
    /// regression.
    pub classes: Option<Vec<String>>,
    /// Classification (labels are classes) or regression (labels are
    /// numbers to predict).
    pub task: Task,
}

/// Reads a CSV file into a dataset of feature rows (`example_shape` is
/// `[features]`), in file order.
pub fn load_csv(path: &Path, spec: &CsvSpec) -> Result<Dataset, DataError> {
    let malformed = |line: usize, reason: String| DataError::Malformed {
        path: path.to_owned(),
        line,
        reason,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| csv_error(path, e))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| csv_error(path, e))?
        .iter()
        .map(str::to_owned)
        .collect();
    let label_column = header
        .iter()
        .position(|h| *h == spec.label)
        .ok_or_else(|| {
            malformed(
                1,
                format!(
                    "no label column '{}' (columns: {})",
                    spec.label,
                    header.join(", ")
                ),
            )
        })?;
    let features = header.len() - 1;
    if features == 0 {
        return Err(malformed(1, "no feature columns besides the label".into()));
    }
    let regression = spec.task == Task::Regression;
    if regression && spec.classes.is_some() {
        return Err(DataError::Invalid(format!(
            "{}: a regression has no classes; drop --classes or use --task classification",
            path.display()
        )));
    }
    let (mut values, mut labels, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    let mut record = csv::StringRecord::new();
    // Line numbers as an editor shows them: the header is line 1.
    let mut line = 1;
    while reader
        .read_record(&mut record)
        .map_err(|e| csv_error(path, e))?
    {
        line += 1;
        if record.len() != header.len() {
            return Err(malformed(
                line,
                format!("{} fields, the header has {}", record.len(), header.len()),
            ));
        }
        for (column, cell) in record.iter().enumerate() {
            if column != label_column {
                values.push(number(cell).map_err(|what| {
                    malformed(
                        line,
                        format!("column '{}': '{cell}' is {what}", header[column]),
                    )
                })?);
                continue;
            }
            if regression {
                targets.push(number(cell).map_err(|what| {
                    malformed(
                        line,
                        format!(
                            "label column '{}': '{cell}' is {what} (a regression predicts numbers)",
                            spec.label
                        ),
                    )
                })?);
                labels.push(0);
                continue;
            }
            match class_id(cell, spec.classes.as_deref()) {
                Ok(id) => labels.push(id),
                Err(LabelError::NameWithoutClasses) => {
                    // Name every class the file uses, so the fix is one flag.
                    let mut names = vec![cell.to_owned()];
                    collect_names(&mut reader, label_column, &mut names);
                    return Err(malformed(
                        line,
                        format!(
                            "label '{cell}' in column '{}' is a class name: list the classes in id order with --classes {} (the same list on every party)",
                            spec.label,
                            names.join(",")
                        ),
                    ));
                }
                Err(e) => {
                    return Err(malformed(
                        line,
                        e.describe(cell, &spec.label, spec.classes.as_deref()),
                    ));
                }
            }
        }
    }
    if labels.is_empty() {
        return Err(malformed(2, "no data rows".into()));
    }
    if regression {
        return Ok(Dataset {
            features: values,
            example_shape: vec![features],
            labels,
            num_classes: 0,
            targets,
            class_names: Vec::new(),
            owners: Vec::new(),
            vocab_size: 0,
        });
    }
    let num_classes = match &spec.classes {
        Some(names) => names.len(),
        None => labels.iter().max().map_or(0, |&m| m as usize + 1),
    };
    if num_classes < 2 {
        return Err(DataError::Invalid(format!(
            "{}: a classification needs at least 2 classes, the labels name {num_classes}",
            path.display()
        )));
    }
    Ok(Dataset {
        features: values,
        example_shape: vec![features],
        labels,
        num_classes,
        targets: Vec::new(),
        class_names: spec.classes.clone().unwrap_or_default(),
        owners: Vec::new(),
        vocab_size: 0,
    })
}

/// A feature cell's value, or what it is instead.
fn number(cell: &str) -> Result<f32, &'static str> {
    match cell.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err("not a finite number"),
        Err(_) => Err("not a number"),
    }
}

/// Why a label cell is not a class id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelError {
    NameWithoutClasses,
    UnknownName,
    NotWholeNumber,
    OutOfRange,
}

impl LabelError {
    fn describe(self, cell: &str, column: &str, classes: Option<&[String]>) -> String {
        let listed = classes.map(|c| c.join(", ")).unwrap_or_default();
        match self {
            Self::NameWithoutClasses => {
                format!("label '{cell}' in column '{column}' is a class name")
            }
            Self::UnknownName => {
                format!("label '{cell}' in column '{column}' is not one of the classes ({listed})")
            }
            Self::NotWholeNumber => format!(
                "label '{cell}' in column '{column}' is not a class id (a whole number from 0)"
            ),
            Self::OutOfRange => format!(
                "label {cell} in column '{column}' is beyond the {} classes ({listed})",
                classes.map_or(0, <[String]>::len)
            ),
        }
    }
}

fn class_id(cell: &str, classes: Option<&[String]>) -> Result<u32, LabelError> {
    if let Some(names) = classes
        && let Some(id) = names.iter().position(|n| n == cell)
    {
        return Ok(id as u32);
    }
    match cell.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.fract() == 0.0 && x < f64::from(u32::MAX) => {
            let id = x as u32;
            match classes {
                Some(names) if id as usize >= names.len() => Err(LabelError::OutOfRange),
                _ => Ok(id),
            }
        }
        Ok(_) => Err(LabelError::NotWholeNumber),
        Err(_) if classes.is_some() => Err(LabelError::UnknownName),
        Err(_) => Err(LabelError::NameWithoutClasses),
    }
}

/// The distinct label names in the rest of the file, in order of first
/// appearance (best effort: for the error message only).
fn collect_names(reader: &mut csv::Reader<std::fs::File>, column: usize, names: &mut Vec<String>) {
    for record in reader.records().map_while(Result::ok) {
        if let Some(cell) = record.get(column)
            && cell.parse::<f64>().is_err()
            && !names.iter().any(|n| n == cell)
        {
            names.push(cell.to_owned());
        }
    }
}

fn csv_error(path: &Path, err: csv::Error) -> DataError {
    let line = err.position().map_or(0, |p| p.line() as usize);
    match err.into_kind() {
        csv::ErrorKind::Io(source) => DataError::Io {
            path: PathBuf::from(path),
            source,
        },
        kind => DataError::Malformed {
            path: path.to_owned(),
            line,
            reason: format!("{kind:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("fedveil-csv-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn spec(label: &str, classes: Option<&[&str]>) -> CsvSpec {
        CsvSpec {
            label: label.into(),
            classes: classes.map(|c| c.iter().map(|s| s.to_string()).collect()),
            task: Task::Classification,
        }
    }

    #[test]
    fn a_regression_reads_numbers_as_targets() {
        let path = write("regr.csv", "a,y,b\n1,0.5,2\n3,-7,4\n");
        let regression = CsvSpec {
            task: Task::Regression,
            ..spec("y", None)
        };
        let d = load_csv(&path, &regression).unwrap();
        assert_eq!(d.targets, vec![0.5, -7.0]);
        assert_eq!((d.labels.clone(), d.num_classes), (vec![0, 0], 0));
        assert_eq!(d.task(), Task::Regression);
        assert_eq!(d.features, vec![1.0, 2.0, 3.0, 4.0]);
        let path = write("regr-bad.csv", "a,y\n1,0.5\n3,high\n");
        let err = load_csv(&path, &regression).unwrap_err().to_string();
        assert!(
            err.contains(":3: label column 'y': 'high' is not a number"),
            "{err}"
        );
        let with_classes = CsvSpec {
            classes: Some(vec!["a".into()]),
            ..regression
        };
        let err = load_csv(&path, &with_classes).unwrap_err().to_string();
        assert!(err.contains("a regression has no classes"), "{err}");
    }

    #[test]
    fn names_map_to_the_listed_order_and_numbers_are_ids() {
        let path = write("names.csv", "a,kind,b\n1,cat,2\n3,dog,4.5\n5,cat,6\n");
        let d = load_csv(&path, &spec("kind", Some(&["dog", "cat"]))).unwrap();
        assert_eq!(d.labels, vec![1, 0, 1]);
        assert_eq!(d.features, vec![1.0, 2.0, 3.0, 4.5, 5.0, 6.0]);
        assert_eq!((d.example_shape.clone(), d.num_classes), (vec![2], 2));
        let path = write("ids.csv", "x,y\n0.5,0\n1.5,2\n");
        let d = load_csv(&path, &spec("y", None)).unwrap();
        assert_eq!((d.labels.clone(), d.num_classes), (vec![0, 2], 3));
    }

    #[test]
    fn bad_cells_name_their_line_and_column() {
        let cases = [
            (
                "x,y\n1,0\nfoo,1\n",
                "y",
                None,
                ":3: column 'x': 'foo' is not a number",
            ),
            ("x,y\n1,0\n2\n", "y", None, ":3:"),
            (
                "x,y\n1,0\n",
                "z",
                None,
                "no label column 'z' (columns: x, y)",
            ),
            ("x,y\n1,cat\n2,dog\n3,cat\n", "y", None, "--classes cat,dog"),
            (
                "x,y\n1,cat\n2,emu\n",
                "y",
                Some(&["cat", "dog"][..]),
                ":3: label 'emu' in column 'y' is not one of the classes (cat, dog)",
            ),
            ("x,y\n1,0.5\n", "y", None, "not a class id"),
            (
                "x,y\n1,0\n2,1\ninf,1\n",
                "y",
                None,
                ":4: column 'x': 'inf' is not a finite number",
            ),
            ("x,y\n", "y", None, "no data rows"),
            ("x,y\n1,0\n", "y", None, "at least 2 classes"),
        ];
        for (i, (text, label, classes, expected)) in cases.into_iter().enumerate() {
            let path = write(&format!("bad{i}.csv"), text);
            let err = load_csv(&path, &spec(label, classes))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
    }

    /// The real tables of the shared data: every row, every class.
    #[test]
    fn the_sklearn_tables_load() {
        let Some(dir) = std::env::var_os(crate::data::DATA_DIR_ENV) else {
            return;
        };
        let dir = PathBuf::from(dir).join("sklearn");
        if !dir.is_dir() {
            return;
        }
        let d = load_csv(
            &dir.join("breast_cancer.csv"),
            &spec("diagnosis", Some(&["malignant", "benign"])),
        )
        .unwrap();
        assert_eq!((d.len(), d.example_len(), d.num_classes), (569, 30, 2));
        assert_eq!(d.class_counts(), vec![212, 357]);
        let d = load_csv(&dir.join("digits.csv"), &spec("digit", None)).unwrap();
        assert_eq!((d.len(), d.example_len(), d.num_classes), (1797, 64, 10));
    }
}
