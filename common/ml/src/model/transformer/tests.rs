use std::sync::Arc;

use burn::prelude::*;

use super::*;
use crate::data::{Dataset, Shard};
use crate::model::{DataShape, TrainPlan, build};
use fedveil_proto::wire::LocalOptimizer;

fn text_shape(seq: usize, classes: usize, vocab: usize) -> DataShape {
    DataShape {
        example_shape: vec![seq],
        num_classes: classes,
        vocab_size: vocab,
    }
}

fn small(causal: bool) -> TextTransformer {
    TextTransformerConfig::new(20, 8, 3)
        .with_d_model(16)
        .with_n_heads(2)
        .with_d_ff(32)
        .with_causal(causal)
        .init(&Device::flex())
}

fn ids(rows: &[&[i32]]) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<i32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [b, s]), &Device::flex())
}

fn close(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn logits_have_one_row_per_sequence_and_one_column_per_class() {
    let m = small(false);
    assert_eq!(
        m.forward(ids(&[&[3, 4, 5, 0], &[6, 7, 0, 0]])).dims(),
        [2, 3]
    );
    let lm = small(true);
    assert_eq!(
        lm.forward(ids(&[&[3, 4, 5, 6, 7, 8, 9, 10]])).dims(),
        [1, 3]
    );
}

#[test]
fn padding_does_not_change_the_pooled_output() {
    let m = small(false);
    let short = m.forward(ids(&[&[3, 4, 5]]));
    let padded = m.forward(ids(&[&[3, 4, 5, 0, 0, 0]]));
    assert!(close(short.clone(), padded) < 1e-5);
    // And a real token there does.
    let longer = m.forward(ids(&[&[3, 4, 5, 6, 0, 0]]));
    assert!(close(short, longer) > 1e-4);
}

#[test]
fn the_language_model_does_not_look_ahead() {
    let lm = small(true);
    let a = lm.hidden(ids(&[&[3, 4, 5, 6]]));
    let b = lm.hidden(ids(&[&[3, 4, 9, 9]]));
    let [_, _, d] = a.dims();
    let head = |h: Tensor<3>, to: usize| h.slice([0..1, 0..to, 0..d]).reshape([to, d]);
    // Positions 0 and 1 see only tokens 3 and 4: identical.
    assert!(close(head(a.clone(), 2), head(b.clone(), 2)) < 1e-6);
    // Position 2 sees the changed token.
    assert!(close(head(a.clone(), 3), head(b.clone(), 3)) > 1e-4);
    // Without the causal mask position 0 already sees the future.
    let enc = small(false);
    let (a, b) = (
        enc.hidden(ids(&[&[3, 4, 5, 6]])),
        enc.hidden(ids(&[&[3, 4, 9, 9]])),
    );
    assert!(close(head(a, 1), head(b, 1)) > 1e-4);
}

/// `n` sequences of length `seq` whose class is their first token mod 3.
fn tiny_text(n: usize, seq: usize) -> Dataset {
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let first = 2 + (i % 9) as u32;
        for j in 0..seq {
            features.push(if j == 0 {
                first
            } else {
                2 + ((i * 7 + j) % 17) as u32
            } as f32);
        }
        labels.push(first % 3);
    }
    Dataset {
        features,
        example_shape: vec![seq],
        labels,
        num_classes: 3,
        targets: Vec::new(),
        class_names: Vec::new(),
        owners: Vec::new(),
        vocab_size: 20,
    }
}

#[test]
fn a_tiny_transformer_overfits_a_tiny_batch_through_the_fl_interface() {
    let data = Arc::new(tiny_text(18, 8));
    let shard = Shard::whole(Arc::clone(&data));
    let device = Device::flex();
    device.seed(7);
    let mut m = build("transformer-cls", &text_shape(8, 3, 20), &device).unwrap();
    let before = m.evaluate(&shard).unwrap();
    let plan = TrainPlan {
        epochs: 60,
        batch_size: 6,
        max_steps: None,
        learning_rate: 0.05,
        shuffle_seed: 1,
        prox_mu: 0.0,
        optimizer: LocalOptimizer::Sgd,
    };
    m.train(&shard, &plan).unwrap();
    let after = m.evaluate(&shard).unwrap();
    assert!(after.loss < before.loss * 0.2, "{before:?} -> {after:?}");
    assert_eq!(after.accuracy(), Some(1.0), "{after:?}");
}

#[test]
fn transformers_flatten_and_come_back_bit_for_bit_and_refuse_images() {
    let device = Device::flex();
    for name in ["transformer-cls", "transformer-lm"] {
        let shape = text_shape(64, 5, 100);
        let a = build(name, &shape, &device).unwrap();
        let mut b = build(name, &shape, &device).unwrap();
        assert_eq!(a.spec().shape_signature, b.spec().shape_signature);
        let p = a.params();
        b.set_params(&p).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&b.params()), bits(&p));
        // The default size: d_model 128, 2 layers, ff 256.
        assert!(
            p.len() > 250_000 && p.len() < 400_000,
            "{name}: {}",
            p.len()
        );
    }
    let images = DataShape {
        example_shape: vec![1, 28, 28],
        num_classes: 10,
        vocab_size: 0,
    };
    assert!(build("transformer-cls", &images, &device).is_err());
    assert!(build("cnn", &text_shape(64, 2, 100), &device).is_err());
}

#[test]
fn sizes_come_from_the_model_name() {
    let device = Device::flex();
    let shape = text_shape(16, 2, 50);
    let small = build(
        "transformer-cls:d_model=32,n_layers=1,n_heads=2,d_ff=64",
        &shape,
        &device,
    )
    .unwrap();
    let default = build("transformer-cls", &shape, &device).unwrap();
    assert!(small.spec().param_count < default.spec().param_count / 4);
    assert_ne!(small.spec().shape_signature, default.spec().shape_signature);
    for bad in [
        "transformer-cls:d_model=30,n_heads=4",
        "transformer-cls:depth=3",
        "transformer-cls:d_model",
        "transformer-cls:n_layers=0",
        "cnn:d_model=8",
    ] {
        assert!(build(bad, &shape, &device).is_err(), "{bad}");
    }
}

#[test]
fn the_language_model_is_trained_on_every_next_token() {
    use crate::model::dense::DenseBatch;
    use crate::model::federated::FederatedModel;
    use burn::nn::loss::CrossEntropyLoss;
    let device = Device::flex();
    // A language model: classes are the vocabulary.
    let lm = TextTransformerConfig::new(10, 8, 10)
        .with_d_model(16)
        .with_n_heads(2)
        .with_d_ff(32)
        .with_causal(true)
        .init(&device);
    let int = |v: Vec<i32>| {
        let n = v.len();
        Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device)
    };
    let batch = |tokens: Tensor<2, Int>, labels| DenseBatch {
        inputs: Inputs::Tokens(tokens),
        labels,
        targets: None,
    };
    let tokens = ids(&[&[3, 4, 5, 6]]);
    let ce = CrossEntropyLoss::new(None, &device);
    let loss = lm
        .train_step(batch(tokens.clone(), int(vec![7])))
        .into_scalar::<f32>();
    // By hand: position i predicts [4, 5, 6, 7][i]; the mean of the four.
    let logits = lm.head.forward(lm.hidden(tokens.clone())).reshape([4, 10]);
    let by_hand = ce
        .forward(logits, int(vec![4, 5, 6, 7]))
        .into_scalar::<f32>();
    assert!((loss - by_hand).abs() < 1e-5, "{loss} vs {by_hand}");
    let last_only = ce
        .forward(lm.forward(tokens), int(vec![7]))
        .into_scalar::<f32>();
    assert!((loss - last_only).abs() > 1e-4);
    // The classifier keeps the plain loss.
    let cls = small(false);
    let t = ids(&[&[3, 4, 5, 0]]);
    let plain = ce
        .forward(cls.forward(t.clone()), int(vec![2]))
        .into_scalar::<f32>();
    let trained = cls.train_step(batch(t, int(vec![2]))).into_scalar::<f32>();
    assert_eq!(plain, trained);
}

/// Batches of short texts are cut to their longest member; the classifier
/// must score them exactly as it scores the full padded rows.
#[test]
fn cutting_trailing_padding_from_batches_changes_no_score() {
    use crate::model::{Federated, FlModel};

    let seq = 12;
    let mut data = tiny_text(10, seq);
    for (i, row) in data.features.chunks_mut(seq).enumerate() {
        // Lengths 1 to 5, the rest PAD: every batch has padding to cut.
        row[1 + i % 5..].fill(PAD as f32);
    }
    let data = Arc::new(data);
    let device = Device::flex();
    let cfg = TextTransformerConfig::new(20, seq, 3)
        .with_d_model(16)
        .with_n_heads(2)
        .with_d_ff(32);
    let m = Federated::new("transformer-cls", |d| cfg.init(d), cfg.batcher(), &device);
    let eval = m.evaluate(&Shard::whole(Arc::clone(&data))).unwrap();

    let rows: Vec<i32> = data.features.iter().map(|&v| v as i32).collect();
    let full = Tensor::<2, Int>::from_data(TensorData::new(rows, [10, seq]), &device);
    let labels: Vec<i32> = data.labels.iter().map(|&l| l as i32).collect();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [10]), &device);
    let logits = m.module().valid().forward(full);
    let loss = burn::nn::loss::CrossEntropyLoss::new(None, &device)
        .forward(logits, labels)
        .into_scalar::<f32>();
    assert!((eval.loss - loss).abs() < 1e-5, "{} vs {loss}", eval.loss);
}
