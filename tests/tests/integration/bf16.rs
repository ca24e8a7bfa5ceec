//! The bf16 base (`torch_dtype = bf16`): close to the f32 base on PEFT's reference batch, LoRA
//! gradients through it, and the training engine equal to the model's own graph on it.
//!
//! Tolerances, for a random-weight model whose weights (initializer range 0.2) are far larger
//! than a pretrained one's, block linears and output head in bf16: measured 1.11% on the
//! logits (relative norm), 5.1e-4 on the LoRA loss and at most 3.7% on a LoRA gradient against
//! f32; asserted at 2%, 1e-3 and 6%. (The int8 base through the int8 kernel, for scale: 3.9%,
//! 9.6e-4 and 12.5%.) The engine against the graph: 7e-8 (loss), 4e-7 (gradients).

use candle_core::{DType, Device, Tensor};
use lorafleet_tests::*;
use lorafleet_worker::adapter_io::load_adapter;
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::dropout::Dropout;
use lorafleet_worker::model::Quantization;
use lorafleet_worker::train::{Path, StepAccumulator};
use lorafleet_worker::Llama;

fn bf16_model() -> Llama {
    let m = Llama::load_quantized(&tiny_llama(), DType::F32, &Device::Cpu, Quantization::Bf16).unwrap();
    assert!(m.bf16_head().is_some(), "torch_dtype bf16 puts the head in bf16 too");
    m
}

fn grads(m: &Llama, path: Path, checkpointing: bool, dropout: &Dropout) -> (f64, Vec<Tensor>) {
    let a = load_adapter(&tiny_llama().join("lora-peft"), m.config(), &Device::Cpu).unwrap();
    let batch = reference_batch(&reference());
    let mut acc = StepAccumulator::with_path(&a, path);
    acc.micro_batch(m, &a, &batch, dropout, checkpointing).unwrap();
    assert_eq!(acc.engine_used(), path == Path::Engine);
    let (g, stats) = acc.reduce(&a, &mut SingleRank, 1).unwrap();
    (stats.loss, g)
}

#[test]
fn bf16_base_stays_close_to_f32_and_trains() {
    let r = reference();
    let batch = reference_batch(&r);
    let m = bf16_model();
    let ids = Tensor::from_slice(&batch.input_ids, (2, 16), &Device::Cpu).unwrap();
    let logits = m.forward_logits(&ids, Some(&batch.attention_mask), None).unwrap();
    let d = rel_norm_diff(&logits, &r["base_logits"]);
    assert!(d < 0.02, "bf16 logits differ from f32 by {d} (relative)");
    assert!(d > 0.0, "the weights were not rounded");
    let ref_loss = f64::from(r["lora_loss"].to_scalar::<f32>().unwrap());
    let a = load_adapter(&tiny_llama().join("lora-peft"), m.config(), &Device::Cpu).unwrap();
    for path in [Path::Engine, Path::Reference] {
        let (loss, g) = grads(&m, path, false, &Dropout::Off);
        assert!(((loss - ref_loss) / ref_loss).abs() < 1e-3, "bf16 loss {loss} vs f32 {ref_loss} ({path:?})");
        for ((name, _), gi) in a.named_vars().iter().zip(&g) {
            let d = rel_norm_diff(gi, &r[&format!("grad.{name}")]);
            assert!(d < 0.06, "{name}: bf16 gradient off by {d} ({path:?})");
        }
    }
}

#[test]
fn the_engine_equals_the_models_graph_on_a_bf16_base() {
    let m = bf16_model();
    let dropout = Dropout::On { seed: 1, step: 2, example_ids: vec![3, 4] };
    let (ref_loss, reference) = grads(&m, Path::Reference, false, &dropout);
    for checkpointing in [false, true] {
        let (loss, g) = grads(&m, Path::Engine, checkpointing, &dropout);
        assert!(((loss - ref_loss) / ref_loss).abs() <= 1e-6, "loss {loss} vs {ref_loss}");
        for (e, r) in g.iter().zip(&reference) {
            let d = rel_norm_diff(e, r);
            assert!(d <= 1e-5, "engine gradient differs from the graph's by {d} (checkpointing {checkpointing})");
        }
    }
}
