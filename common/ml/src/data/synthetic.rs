//! A small, learnable image dataset generated from a seed, for fast tests and
//! for machines without the real data.
//!
//! Each class is a fixed pattern of a few bright strokes; an example is its
//! class pattern shifted by up to two pixels with Gaussian pixel noise. A CNN
//! learns it in a round or two, yet it is not linearly trivial.

use std::sync::Arc;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use super::{Dataset, Split};

/// Shape and size of the synthetic dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Training examples to generate.
    pub train_examples: usize,
    /// Test examples to generate.
    pub test_examples: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Standard deviation of the per-pixel Gaussian noise.
    pub noise: f32,
    /// Largest shift of the pattern, in pixels, in each direction.
    pub max_shift: i32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            train_examples: 2000,
            test_examples: 500,
            num_classes: 10,
            height: 28,
            width: 28,
            noise: 0.3,
            max_shift: 2,
        }
    }
}

impl SyntheticConfig {
    /// Generates train and test splits; the same seed gives the same data.
    pub fn generate(&self, seed: u64) -> Split {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let patterns: Vec<Vec<f32>> = (0..self.num_classes)
            .map(|_| self.pattern(&mut rng))
            .collect();
        let train = self.sample(&patterns, self.train_examples, &mut rng);
        let test = self.sample(&patterns, self.test_examples, &mut rng);
        Split {
            train: Arc::new(train),
            test: Arc::new(test),
        }
    }

    fn pattern(&self, rng: &mut ChaCha20Rng) -> Vec<f32> {
        let (h, w) = (self.height, self.width);
        let mut img = vec![0.0; h * w];
        for _ in 0..3 {
            let horizontal = rng.random_bool(0.5);
            let (len, thick) = (rng.random_range(h / 3..=2 * h / 3), rng.random_range(2..=3));
            let (rows, cols) = if horizontal {
                (thick, len)
            } else {
                (len, thick)
            };
            let r0 = rng.random_range(3..h - rows - 3);
            let c0 = rng.random_range(3..w - cols - 3);
            for r in r0..r0 + rows {
                for c in c0..c0 + cols {
                    img[r * w + c] = 1.0;
                }
            }
        }
        img
    }

    fn sample(&self, patterns: &[Vec<f32>], n: usize, rng: &mut ChaCha20Rng) -> Dataset {
        let (h, w) = (self.height, self.width);
        let noise = Normal::new(0.0f32, self.noise).expect("finite noise");
        let mut features = Vec::with_capacity(n * h * w);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let label = rng.random_range(0..self.num_classes);
            let (dr, dc) = (
                rng.random_range(-self.max_shift..=self.max_shift),
                rng.random_range(-self.max_shift..=self.max_shift),
            );
            for r in 0..h as i32 {
                for c in 0..w as i32 {
                    let (sr, sc) = (r - dr, c - dc);
                    let base = if (0..h as i32).contains(&sr) && (0..w as i32).contains(&sc) {
                        patterns[label][sr as usize * w + sc as usize]
                    } else {
                        0.0
                    };
                    features.push((base + noise.sample(rng)).clamp(0.0, 1.0));
                }
            }
            labels.push(label as u32);
        }
        Dataset {
            features,
            example_shape: vec![1, h, w],
            labels,
            num_classes: self.num_classes,
            targets: Vec::new(),
            class_names: Vec::new(),
            owners: Vec::new(),
            vocab_size: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_well_formed() {
        let cfg = SyntheticConfig {
            train_examples: 100,
            test_examples: 20,
            ..Default::default()
        };
        let a = cfg.generate(1);
        assert_eq!(a.train.len(), 100);
        assert_eq!(a.test.len(), 20);
        assert_eq!(a.train.features.len(), 100 * 28 * 28);
        assert!(a.train.features.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(*a.train, *cfg.generate(1).train);
        assert_ne!(*a.train, *cfg.generate(2).train);
    }

    #[test]
    fn classes_are_separable_by_nearest_pattern_mean() {
        // Class means of the training set classify the test set well: the
        // task is learnable (a sanity check, not a model test).
        let s = SyntheticConfig::default().generate(3);
        let d = s.train.example_len();
        let mut means = vec![vec![0.0f32; d]; 10];
        let counts = s.train.class_counts();
        for i in 0..s.train.len() {
            let l = s.train.labels[i] as usize;
            for (m, x) in means[l].iter_mut().zip(s.train.example(i)) {
                *m += x / counts[l] as f32;
            }
        }
        let correct = (0..s.test.len())
            .filter(|&i| {
                let x = s.test.example(i);
                let best = (0..10)
                    .min_by(|&a, &b| {
                        let dist = |m: &Vec<f32>| {
                            m.iter().zip(x).map(|(p, q)| (p - q) * (p - q)).sum::<f32>()
                        };
                        dist(&means[a]).total_cmp(&dist(&means[b]))
                    })
                    .unwrap();
                best as u32 == s.test.labels[i]
            })
            .count();
        assert!(correct as f64 / s.test.len() as f64 > 0.8, "{correct}");
    }
}
