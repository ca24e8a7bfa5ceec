//! Gradient checkpointing changes memory, not numbers: with LoRA dropout on every linear
//! layer, the checkpointed backward equals the plain one.

use candle_core::{DType, Device, Tensor};
use lorafleet_common::{LoraConfig, TargetModules};
use lorafleet_tests::*;
use lorafleet_worker::dropout::Dropout;
use lorafleet_worker::train::StepAccumulator;
use lorafleet_worker::{Llama, LoraAdapter};

#[test]
fn checkpointed_and_plain_backward_agree_with_dropout_on() {
    let m = Llama::load(&tiny_llama(), DType::F32, &Device::Cpu).unwrap();
    let config = LoraConfig { target_modules: TargetModules::AllLinear, lora_dropout: 0.1, ..LoraConfig::default() };
    let a = LoraAdapter::init(config, m.config(), 3, &Device::Cpu).unwrap();
    // Non-zero B so that every parameter (A included) has a gradient.
    for (i, (_, v)) in a.named_vars().into_iter().enumerate() {
        let noise = (Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap() * (1.0 + i as f64 * 0.01)).unwrap();
        v.set(&noise).unwrap();
    }
    let batch = reference_batch(&reference());
    let dropout = Dropout::On { seed: 11, step: 5, example_ids: vec![40, 41] };
    let run = |checkpointing: bool| {
        let mut acc = StepAccumulator::new(&a);
        let (loss, tokens) = acc.micro_batch(&m, &a, &batch, &dropout, checkpointing).unwrap();
        let (grads, _) = acc.reduce(&a, &mut lorafleet_worker::collective::SingleRank, 5).unwrap();
        (loss, tokens, grads)
    };
    let (plain_loss, plain_tokens, plain) = run(false);
    let (ckpt_loss, ckpt_tokens, ckpt) = run(true);
    assert_eq!(plain_tokens, ckpt_tokens);
    assert!(((plain_loss - ckpt_loss) / plain_loss).abs() <= 1e-6, "{plain_loss} vs {ckpt_loss}");
    assert_eq!(plain.len(), 2 * 2 * 7);
    for ((name, _), (p, c)) in a.named_vars().iter().zip(plain.iter().zip(&ckpt)) {
        let d = rel_norm_diff(c, p);
        assert!(d <= 1e-6, "{name}: relative difference {d}");
        assert!(p.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name} got no gradient");
    }
    // Dropout is really on: without it the loss differs.
    let mut acc = StepAccumulator::new(&a);
    let (no_dropout, _) = acc.micro_batch(&m, &a, &batch, &Dropout::Off, true).unwrap();
    assert!((no_dropout - plain_loss).abs() > 1e-4);
}
