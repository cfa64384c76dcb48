//! Streaming weighted averaging: each update is folded into a running sum as
//! it arrives, so the server holds O(model size) memory however many clients
//! report. Sums are kept in `f64`, so the order of arrival does not change
//! the result beyond the final rounding to `f32`.

/// Why an update could not be added.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("update has {got} values, the model has {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("update contains a non-finite value at index {index}")]
    NonFinite { index: usize },
    #[error("weight {0} is not a positive finite number")]
    BadWeight(f64),
}

/// Running `sum(w_i * x_i)` and `sum(w_i)`.
#[derive(Debug, Clone)]
pub struct WeightedMean {
    sum: Vec<f64>,
    total_weight: f64,
    count: usize,
}

impl WeightedMean {
    pub fn new(len: usize) -> Self {
        Self {
            sum: vec![0.0; len],
            total_weight: 0.0,
            count: 0,
        }
    }

    /// Checks an update without adding it (length, finiteness).
    pub fn validate(&self, values: &[f32]) -> Result<(), AggregateError> {
        if values.len() != self.sum.len() {
            return Err(AggregateError::WrongLength {
                got: values.len(),
                expected: self.sum.len(),
            });
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite { index });
        }
        Ok(())
    }

    /// Adds `weight * values`. Nothing changes if the update is refused.
    pub fn add(&mut self, values: &[f32], weight: f64) -> Result<(), AggregateError> {
        if !(weight > 0.0 && weight.is_finite()) {
            return Err(AggregateError::BadWeight(weight));
        }
        self.validate(values)?;
        for (s, &v) in self.sum.iter_mut().zip(values) {
            *s += weight * f64::from(v);
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The weighted mean, or `None` if nothing was added.
    pub fn mean(&self) -> Option<Vec<f32>> {
        (self.count > 0).then(|| {
            self.sum
                .iter()
                .map(|s| (s / self.total_weight) as f32)
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_matches_definition() {
        let mut m = WeightedMean::new(3);
        m.add(&[1.0, 2.0, 3.0], 1.0).unwrap();
        m.add(&[3.0, 2.0, -1.0], 3.0).unwrap();
        assert_eq!(m.mean().unwrap(), vec![2.5, 2.0, 0.0]);
        assert_eq!(m.count(), 2);
        assert_eq!(m.total_weight(), 4.0);
    }

    #[test]
    fn refuses_bad_updates_without_changing_state() {
        let mut m = WeightedMean::new(2);
        m.add(&[1.0, 1.0], 2.0).unwrap();
        assert_eq!(
            m.add(&[1.0], 1.0),
            Err(AggregateError::WrongLength {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(
            m.add(&[1.0, f32::NAN], 1.0),
            Err(AggregateError::NonFinite { index: 1 })
        );
        assert_eq!(
            m.add(&[f32::INFINITY, 0.0], 1.0),
            Err(AggregateError::NonFinite { index: 0 })
        );
        assert!(m.add(&[1.0, 1.0], 0.0).is_err());
        assert!(m.add(&[1.0, 1.0], f64::NAN).is_err());
        assert_eq!(m.mean().unwrap(), vec![1.0, 1.0]);
        assert_eq!(m.count(), 1);
    }

    #[test]
    fn empty_has_no_mean() {
        assert!(WeightedMean::new(4).mean().is_none());
    }
}
