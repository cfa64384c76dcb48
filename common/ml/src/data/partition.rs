//! Splitting a dataset among clients: IID, Dirichlet label skew, and
//! McMahan-style pathological shards. Every split is a pure function of the
//! labels, the client count and the seed.

use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Gamma};

use super::DataError;

/// Dirichlet splits are redrawn until every client has at least this many
/// examples (or `len / clients` when the dataset is smaller than that).
pub const DIRICHLET_MIN_EXAMPLES: usize = 10;
/// How many Dirichlet draws to try before giving up.
pub const DIRICHLET_MAX_TRIES: usize = 1000;

/// How examples are assigned to clients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partition {
    /// Uniformly at random, equal sizes (±1).
    Iid,
    /// For each class, client proportions ~ Dirichlet(alpha); small alpha = skewed.
    Dirichlet {
        /// Concentration: small values give few classes per client.
        alpha: f64,
    },
    /// Sort by label, cut into `clients * per_client` shards, deal each client
    /// `per_client` random shards (McMahan et al. 2017 use 2).
    Shards {
        /// Label-sorted shards each client gets.
        per_client: usize,
    },
    /// The dataset's own owners (LEAF writers): each client gets one
    /// owner's examples; with fewer clients than owners, a seeded random
    /// choice of owners takes part.
    Natural,
}

impl FromStr for Partition {
    type Err = DataError;

    /// `iid`, `dirichlet:ALPHA`, `shards:K`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            DataError::Invalid(format!(
                "partition '{s}': expected iid, natural, dirichlet:ALPHA (ALPHA > 0) or shards:K (K >= 1)"
            ))
        };
        match s.split_once(':') {
            None if s == "iid" => Ok(Partition::Iid),
            None if s == "natural" => Ok(Partition::Natural),
            Some(("dirichlet", a)) => match a.parse::<f64>() {
                Ok(alpha) if alpha > 0.0 && alpha.is_finite() => Ok(Partition::Dirichlet { alpha }),
                _ => Err(bad()),
            },
            Some(("shards", k)) => match k.parse::<usize>() {
                Ok(per_client) if per_client >= 1 => Ok(Partition::Shards { per_client }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Partition::Iid => write!(f, "iid"),
            Partition::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            Partition::Shards { per_client } => write!(f, "shards:{per_client}"),
            Partition::Natural => write!(f, "natural"),
        }
    }
}

impl Partition {
    /// Example indices of `data` for each of `clients` clients; the natural
    /// partition reads the dataset's owners, the others only its labels.
    pub fn split_dataset(
        &self,
        data: &super::Dataset,
        clients: usize,
        seed: u64,
    ) -> Result<Vec<Vec<usize>>, DataError> {
        let label_skew = matches!(self, Partition::Dirichlet { .. } | Partition::Shards { .. });
        if label_skew && data.task() == super::Task::Regression {
            return Err(DataError::Invalid(format!(
                "the {self} partition skews clients by class, and regression data has none: use iid (or natural)"
            )));
        }
        if *self != Partition::Natural {
            return self.split(&data.labels, data.num_classes, clients, seed);
        }
        if data.owners.len() != data.len() {
            return Err(DataError::Invalid(
                "the natural partition needs a dataset split by owner (e.g. femnist)".into(),
            ));
        }
        let mut by_owner: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (i, &o) in data.owners.iter().enumerate() {
            by_owner.entry(o).or_default().push(i);
        }
        let mut groups: Vec<Vec<usize>> = by_owner.into_values().collect();
        if clients == 0 || clients > groups.len() {
            return Err(DataError::Invalid(format!(
                "the natural partition has {} owners; cannot give {clients} clients one each",
                groups.len()
            )));
        }
        if clients < groups.len() {
            groups.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
            groups.truncate(clients);
        }
        Ok(groups)
    }

    /// Example indices for each of `clients` clients, from the labels
    /// (every partition but [`Partition::Natural`]).
    pub fn split(
        &self,
        labels: &[u32],
        num_classes: usize,
        clients: usize,
        seed: u64,
    ) -> Result<Vec<Vec<usize>>, DataError> {
        if clients == 0 {
            return Err(DataError::Invalid(
                "cannot partition among 0 clients".into(),
            ));
        }
        if labels.len() < clients {
            return Err(DataError::Invalid(format!(
                "{} examples cannot be split among {clients} clients",
                labels.len()
            )));
        }
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let parts = match *self {
            Partition::Natural => {
                return Err(DataError::Invalid(
                    "the natural partition needs the dataset's owners (use split_dataset)".into(),
                ));
            }
            Partition::Iid => {
                let mut idx: Vec<usize> = (0..labels.len()).collect();
                idx.shuffle(&mut rng);
                even_chunks(&idx, clients)
            }
            Partition::Dirichlet { alpha } => {
                dirichlet(labels, num_classes, clients, alpha, &mut rng)?
            }
            Partition::Shards { per_client } => {
                let shards = clients * per_client;
                if shards > labels.len() {
                    return Err(DataError::Invalid(format!(
                        "{shards} shards from {} examples",
                        labels.len()
                    )));
                }
                let mut by_label: Vec<usize> = (0..labels.len()).collect();
                by_label.sort_by_key(|&i| (labels[i], i));
                let pieces = even_chunks(&by_label, shards);
                let mut order: Vec<usize> = (0..shards).collect();
                order.shuffle(&mut rng);
                order
                    .chunks(per_client)
                    .map(|ids| {
                        ids.iter()
                            .flat_map(|&s| pieces[s].iter().copied())
                            .collect()
                    })
                    .collect()
            }
        };
        Ok(parts)
    }
}

/// Splits `items` into `n` contiguous chunks whose sizes differ by at most 1.
fn even_chunks(items: &[usize], n: usize) -> Vec<Vec<usize>> {
    (0..n)
        .map(|i| items[i * items.len() / n..(i + 1) * items.len() / n].to_vec())
        .collect()
}

fn dirichlet(
    labels: &[u32],
    num_classes: usize,
    clients: usize,
    alpha: f64,
    rng: &mut ChaCha20Rng,
) -> Result<Vec<Vec<usize>>, DataError> {
    let gamma =
        Gamma::new(alpha, 1.0).map_err(|e| DataError::Invalid(format!("alpha {alpha}: {e}")))?;
    let min_size = DIRICHLET_MIN_EXAMPLES.min(labels.len() / clients);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    for _ in 0..DIRICHLET_MAX_TRIES {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); clients];
        for class in &mut by_class {
            class.shuffle(rng);
            let mut weights: Vec<f64> = (0..clients).map(|_| gamma.sample(rng)).collect();
            let total: f64 = weights.iter().sum();
            if total > 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            } else {
                // Every draw underflowed (tiny alpha): the class goes to one client.
                let pick = (rng.next_u64() % clients as u64) as usize;
                weights
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, w)| *w = f64::from(u8::from(i == pick)));
            }
            let mut start = 0;
            let mut acc = 0.0;
            for (client, w) in weights.iter().enumerate() {
                acc += w;
                let end = if client + 1 == clients {
                    class.len()
                } else {
                    ((acc * class.len() as f64).round() as usize).min(class.len())
                };
                parts[client].extend_from_slice(&class[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if parts.iter().all(|p| p.len() >= min_size) {
            return Ok(parts);
        }
    }
    Err(DataError::Invalid(format!(
        "dirichlet:{alpha} could not give each of {clients} clients {min_size} examples \
         in {DIRICHLET_MAX_TRIES} draws; use a larger alpha or fewer clients"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, classes: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i % classes).collect()
    }

    fn check_disjoint_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..n).collect::<Vec<_>>(),
            "every example exactly once"
        );
    }

    #[test]
    fn parses_and_prints() {
        for s in ["iid", "dirichlet:0.1", "shards:2"] {
            assert_eq!(s.parse::<Partition>().unwrap().to_string(), s);
        }
        for s in [
            "",
            "dirichlet:0",
            "dirichlet:-1",
            "shards:0",
            "random",
            "dirichlet:x",
        ] {
            assert!(s.parse::<Partition>().is_err(), "{s}");
        }
    }

    #[test]
    fn iid_is_even_and_balanced() {
        let l = labels(10_000, 10);
        let parts = Partition::Iid.split(&l, 10, 7, 1).unwrap();
        check_disjoint_cover(&parts, l.len());
        for p in &parts {
            assert!(p.len() == 1428 || p.len() == 1429);
            // Each class near 10%.
            let c0 = p.iter().filter(|&&i| l[i] == 0).count() as f64 / p.len() as f64;
            assert!((c0 - 0.1).abs() < 0.03, "{c0}");
        }
    }

    #[test]
    fn shards_give_few_labels_per_client() {
        let l = labels(6000, 10);
        let parts = Partition::Shards { per_client: 2 }
            .split(&l, 10, 100, 3)
            .unwrap();
        check_disjoint_cover(&parts, l.len());
        for p in &parts {
            assert_eq!(p.len(), 60);
            let mut classes: Vec<u32> = p.iter().map(|&i| l[i]).collect();
            classes.sort_unstable();
            classes.dedup();
            assert!(classes.len() <= 2, "{classes:?}");
        }
    }

    #[test]
    fn dirichlet_skew_follows_alpha() {
        let l = labels(20_000, 10);
        let skew = |alpha: f64| {
            let parts = Partition::Dirichlet { alpha }.split(&l, 10, 20, 5).unwrap();
            check_disjoint_cover(&parts, l.len());
            assert!(parts.iter().all(|p| p.len() >= DIRICHLET_MIN_EXAMPLES));
            // Mean share of a client's most common class.
            parts
                .iter()
                .map(|p| {
                    let mut c = [0usize; 10];
                    p.iter().for_each(|&i| c[l[i] as usize] += 1);
                    *c.iter().max().unwrap() as f64 / p.len() as f64
                })
                .sum::<f64>()
                / parts.len() as f64
        };
        let (skewed, mild) = (skew(0.1), skew(100.0));
        assert!(skewed > 0.5, "alpha 0.1 top-class share {skewed}");
        assert!(mild < 0.2, "alpha 100 top-class share {mild}");
    }

    #[test]
    fn deterministic_in_seed() {
        let l = labels(1000, 10);
        let p = Partition::Dirichlet { alpha: 0.5 };
        assert_eq!(
            p.split(&l, 10, 10, 9).unwrap(),
            p.split(&l, 10, 10, 9).unwrap()
        );
        assert_ne!(
            p.split(&l, 10, 10, 9).unwrap(),
            p.split(&l, 10, 10, 10).unwrap()
        );
    }

    #[test]
    fn refuses_impossible_splits() {
        assert!(Partition::Iid.split(&labels(5, 2), 2, 6, 0).is_err());
        assert!(Partition::Iid.split(&labels(5, 2), 2, 0, 0).is_err());
        assert!(
            Partition::Shards { per_client: 3 }
                .split(&labels(5, 2), 2, 2, 0)
                .is_err()
        );
    }
}
