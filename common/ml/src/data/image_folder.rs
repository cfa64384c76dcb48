//! Image folders as datasets: one subfolder per class, PNG or JPEG files in
//! each, every image converted to the channels asked for and resized to a
//! square side, pixel values scaled to [0, 1] as the IDX loader does.
//!
//! Class ids follow the class list the settings give, the same on every
//! party; without one, the sorted subfolder names (right when every party
//! has every class, as in a simulation over one folder).

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::{DataError, Dataset};

/// How the images of a folder become examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFolderSpec {
    /// Side of the square every image is resized to.
    pub side: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Class names (subfolder names) in id order.
    pub classes: Option<Vec<String>>,
}

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Reads every image under `root/<class>/`, in sorted class then file
/// order.
pub fn load_image_folder(root: &Path, spec: &ImageFolderSpec) -> Result<Dataset, DataError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DataError::Io { path, source }
    };
    if !matches!(spec.channels, 1 | 3) {
        return Err(DataError::Invalid(format!(
            "images have 1 (grey) or 3 (RGB) channels, not {}",
            spec.channels
        )));
    }
    if spec.side == 0 {
        return Err(DataError::Invalid("image side must be positive".into()));
    }
    let mut folders: Vec<String> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let classes = spec.classes.clone().unwrap_or_else(|| folders.clone());
    if let Some(stray) = folders.iter().find(|f| !classes.contains(f)) {
        return Err(DataError::Invalid(format!(
            "{}: folder '{stray}' is not one of the classes ({})",
            root.display(),
            classes.join(", ")
        )));
    }
    if classes.len() < 2 {
        return Err(DataError::Invalid(format!(
            "{}: an image folder needs a subfolder per class, at least 2 (found {})",
            root.display(),
            folders.len()
        )));
    }
    let side = spec.side as u32;
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for folder in &folders {
        let dir = root.join(folder);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
            })
            .collect();
        files.sort();
        let id = classes
            .iter()
            .position(|c| c == folder)
            .expect("checked above") as u32;
        for file in files {
            let image = image::open(&file).map_err(|e| {
                DataError::Invalid(format!(
                    "{}: not a readable PNG or JPEG image: {e}",
                    file.display()
                ))
            })?;
            let image = image.resize_exact(side, side, FilterType::Triangle);
            let pixels: Vec<u8> = match spec.channels {
                1 => image.to_luma8().into_raw(),
                _ => {
                    // Channel-major ([c, h, w]), as the CNN takes it.
                    let rgb = image.to_rgb8().into_raw();
                    (0..3)
                        .flat_map(|c| rgb.iter().skip(c).step_by(3).copied().collect::<Vec<_>>())
                        .collect()
                }
            };
            features.extend(pixels.iter().map(|&p| f32::from(p) / 255.0));
            labels.push(id);
        }
    }
    if labels.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: no {} images in the class folders",
            root.display(),
            IMAGE_EXTENSIONS.join("/")
        )));
    }
    Ok(Dataset {
        features,
        example_shape: vec![spec.channels, spec.side, spec.side],
        labels,
        num_classes: classes.len(),
        targets: Vec::new(),
        class_names: classes.clone(),
        owners: Vec::new(),
        vocab_size: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fedveil-images-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn spec(side: usize, channels: usize) -> ImageFolderSpec {
        ImageFolderSpec {
            side,
            channels,
            classes: None,
        }
    }

    #[test]
    fn classes_are_folders_and_images_are_resized_and_scaled() {
        let root = folder("basic");
        for (class, value) in [("dark", 0u8), ("light", 255u8)] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            for i in 0..3 {
                let img = image::RgbImage::from_pixel(40, 30, image::Rgb([value, value, value]));
                img.save(root.join(class).join(format!("{i}.png"))).unwrap();
            }
        }
        std::fs::write(root.join("light/notes.txt"), "not an image").unwrap();
        let d = load_image_folder(&root, &spec(28, 1)).unwrap();
        assert_eq!(
            (d.len(), d.example_shape.clone(), d.num_classes),
            (6, vec![1, 28, 28], 2)
        );
        assert_eq!(d.labels, vec![0, 0, 0, 1, 1, 1]);
        assert!(d.example(0).iter().all(|&p| p == 0.0));
        assert!(d.example(5).iter().all(|&p| p == 1.0));
        let rgb = load_image_folder(&root, &spec(8, 3)).unwrap();
        assert_eq!(rgb.example_len(), 3 * 8 * 8);
        // A class list decides the ids.
        let flipped = ImageFolderSpec {
            classes: Some(vec!["light".into(), "dark".into()]),
            ..spec(8, 1)
        };
        assert_eq!(
            load_image_folder(&root, &flipped).unwrap().labels,
            vec![1, 1, 1, 0, 0, 0]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_folders_are_refused_by_name() {
        let root = folder("bad");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        let err = load_image_folder(&root, &spec(8, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no png/jpg/jpeg images"), "{err}");
        std::fs::write(root.join("a/broken.png"), b"not a png").unwrap();
        let err = load_image_folder(&root, &spec(8, 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.png") && err.contains("not a readable"),
            "{err}"
        );
        let only = ImageFolderSpec {
            classes: Some(vec!["a".into()]),
            ..spec(8, 1)
        };
        let err = load_image_folder(&root, &only).unwrap_err().to_string();
        assert!(
            err.contains("folder 'b' is not one of the classes (a)"),
            "{err}"
        );
        assert!(load_image_folder(&root, &spec(8, 2)).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
