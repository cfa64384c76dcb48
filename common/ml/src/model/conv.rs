//! A 2-D convolution lowered to one matrix product (im2col), for a fast
//! backward pass on CPU.
//!
//! Burn 0.22 derives a convolution's weight gradient as another convolution,
//! over swapped batch and channel axes, whose kernel is the whole output
//! plane: flex runs that as one im2col tile on one thread (K = batch x output
//! pixels, 43,264 for the CNN's first layer), the largest cost of a CNN
//! training step. Written as shifted slices stacked into columns and one
//! batched matmul, autodiff derives the weight gradient as a batched matmul
//! instead, threaded over the batch like the forward pass. Parameters,
//! initialisation and results are those of `burn::nn::conv::Conv2d` with
//! stride 1 and no padding or dilation (the tests check the outputs and
//! gradients against it), and it runs on every backend.

use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::prelude::*;

/// `Conv2d` (stride 1, valid padding) as im2col + matmul. See the module
/// docs for why.
#[derive(Module, Debug)]
pub struct LoweredConv2d {
    /// `[channels_out, channels_in, kernel_h, kernel_w]`, as in `Conv2d`.
    pub weight: Param<Tensor<4>>,
    /// `[channels_out]`, as in `Conv2d`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl LoweredConv2d {
    /// A convolution from `channels[0]` to `channels[1]` channels with a
    /// `kernel` window, initialised by `Conv2dConfig::new(channels,
    /// kernel).init(device)` itself (same distribution, same draws).
    pub fn new(channels: [usize; 2], kernel: [usize; 2], device: &Device) -> Self {
        let reference = Conv2dConfig::new(channels, kernel).init(device);
        Self {
            weight: reference.weight,
            bias: reference.bias,
        }
    }

    /// `[batch, channels_out, h - kh + 1, w - kw + 1]` from `[batch,
    /// channels_in, h, w]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, channels, height, width] = x.dims();
        let [out_channels, _, kh, kw] = self.weight.dims();
        let (oh, ow) = (height + 1 - kh, width + 1 - kw);
        let shifted = (0..kh)
            .flat_map(|i| (0..kw).map(move |j| (i, j)))
            .map(|(i, j)| {
                x.clone()
                    .slice([0..batch, 0..channels, i..i + oh, j..j + ow])
            })
            .collect();
        // [batch, (i, j, c), oh * ow]: one copy of the input per kernel
        // position, concatenated along channels (stacking along a new axis
        // would copy each one twice).
        let columns = Tensor::cat(shifted, 1).reshape([batch, kh * kw * channels, oh * ow]);
        // The weight in the same (i, j, c) order.
        let kernel =
            self.weight
                .val()
                .permute([0, 2, 3, 1])
                .reshape([1, out_channels, kh * kw * channels]);
        let y = kernel
            .matmul(columns)
            .reshape([batch, out_channels, oh, ow]);
        match &self.bias {
            Some(bias) => y + bias.val().reshape([1, out_channels, 1, 1]),
            None => y,
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::conv::Conv2d;
    use burn::tensor::Distribution;

    use super::*;

    fn largest_difference(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// Outputs and the gradients of weight, bias and input equal those of
    /// Burn's own convolution, which computes them by its generic path.
    #[test]
    fn matches_burns_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        for (channels, kernel, side) in [
            ([1, 4], [3, 3], 9),
            ([3, 5], [3, 2], 7),
            ([6, 2], [1, 1], 4),
        ] {
            let reference: Conv2d = Conv2dConfig::new(channels, kernel).init(&device);
            let lowered = LoweredConv2d {
                weight: reference.weight.clone(),
                bias: reference.bias.clone(),
            };
            let x = Tensor::<4>::random(
                [5, channels[0], side, side],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
            .require_grad();
            let y_ref = reference.forward(x.clone());
            let y = lowered.forward(x.clone());
            assert_eq!(y.dims(), y_ref.dims());
            assert!(largest_difference(y.clone(), y_ref.clone()) < 1e-5);
            // A loss that weighs every output differently.
            let weights = Tensor::<4>::random(y.dims(), Distribution::Normal(0.0, 1.0), &device);
            let g_ref = (y_ref * weights.clone()).sum().backward();
            let g = (y * weights).sum().backward();
            let grad4 = |t: &Tensor<4>, g| t.grad(g).unwrap();
            assert!(
                largest_difference(
                    grad4(&lowered.weight.val(), &g),
                    grad4(&reference.weight.val(), &g_ref)
                ) < 1e-4
            );
            assert!(largest_difference(grad4(&x, &g), grad4(&x, &g_ref)) < 1e-4);
            let bias = |c: &Option<Param<Tensor<1>>>, g| c.as_ref().unwrap().val().grad(g).unwrap();
            let db = (bias(&lowered.bias, &g) - bias(&reference.bias, &g_ref))
                .abs()
                .max()
                .into_scalar::<f32>();
            assert!(db < 1e-4, "bias gradient differs by {db}");
        }
    }
}
