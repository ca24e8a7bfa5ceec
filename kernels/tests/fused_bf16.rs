//! The bf16 products against the f32 GEMM on the same bf16-rounded operands.

use half::bf16;
use lorafleet_kernels::fused::bf16::{force_fallback, kernels_available, Bf16Scratch, PackedBf16};
use lorafleet_kernels::fused::gemm::{matmul, MatMut, MatRef, Par};
use lorafleet_kernels::fused::head_loss::{self, Head, HeadScratch};

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.7311 + seed).sin() * 1.7).powi(3)).collect()
}

fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// Forward and backward of rows `r0..r0 + rows` of an `out × inp` weight over `n` tokens,
/// with the kernel (`fast`) or the fallback, against f32 products of the rounded operands.
fn check(n: usize, out: usize, inp: usize, r0: usize, rows: usize, fast: bool) {
    force_fallback(!fast);
    let w = values(out * inp, 0.3);
    let packed = PackedBf16::new(&w, out, inp);
    let view = packed.rows(r0, rows).expect("a panel-aligned view");
    let wr = rounded(&w[r0 * inp..(r0 + rows) * inp]);
    assert_eq!(view.to_f32(), wr, "the packed weight widens back to its bf16 rounding");
    let x = values(n * inp, 1.1);
    // The kernel rounds activations to bf16; the fallback keeps them in f32.
    let xr = if kernels_available() { rounded(&x) } else { x.clone() };
    let mut want = vec![0f32; n * rows];
    matmul(
        MatMut::new(&mut want, n, rows),
        MatRef::new(&xr, n, inp),
        MatRef::new(&wr, rows, inp).t(),
        1.0,
        false,
        Par::Seq,
    );
    let mut scratch = Bf16Scratch::default();
    // y is a block of a wider buffer (as the engine's fused q|k|v output).
    let width = rows + 5;
    let mut wide = vec![f32::NAN; n * width];
    view.forward(MatRef::new(&x, n, inp), MatMut::block(&mut wide, width, 0, n, 2, rows), &mut scratch);
    let got: Vec<f32> = wide.chunks(width).flat_map(|r| r[2..2 + rows].to_vec()).collect();
    assert!(
        rel_err(&got, &want) < 2e-5,
        "forward {n}x{out}x{inp} rows {r0}+{rows} fast={fast}: {}",
        rel_err(&got, &want)
    );
    assert!(wide.chunks(width).all(|r| r[0].is_nan() && r[1].is_nan() && r[2 + rows..].iter().all(|v| v.is_nan())));

    let dy = values(n * rows, 2.9);
    let dyr = if kernels_available() { rounded(&dy) } else { dy.clone() };
    let base = values(n * inp, 4.2);
    for accumulate in [false, true] {
        let mut want = if accumulate { base.clone() } else { vec![0f32; n * inp] };
        matmul(
            MatMut::new(&mut want, n, inp),
            MatRef::new(&dyr, n, rows),
            MatRef::new(&wr, rows, inp),
            1.0,
            true,
            Par::Seq,
        );
        let mut got = if accumulate { base.clone() } else { vec![f32::NAN; n * inp] };
        view.backward(MatRef::new(&dy, n, rows), MatMut::new(&mut got, n, inp), accumulate, &mut scratch);
        let e = rel_err(&got, &want);
        assert!(e < 2e-5, "backward {n}x{out}x{inp} rows {r0}+{rows} acc={accumulate} fast={fast}: {e}");
    }
}

#[test]
fn products_match_f32_on_the_rounded_operands_at_every_edge() {
    for fast in [true, false] {
        // Whole weights: edges of every tile size (8 rows, 48 and 192 columns, 128 pairs).
        for (n, out, inp) in [(1, 16, 2), (7, 33, 5), (9, 49, 300), (70, 200, 257), (130, 96, 64)] {
            check(n, out, inp, 0, out, fast);
        }
        // A module's rows of a concatenated weight, with an odd row count (the last pair of the
        // backward then holds the next module's row, multiplied by zero).
        check(19, 112, 40, 32, 37, fast);
        check(19, 112, 40, 16, 96, fast);
    }
    force_fallback(false);
}

#[test]
fn views_must_start_a_panel() {
    let packed = PackedBf16::new(&values(64 * 16, 0.0), 64, 16);
    assert!(packed.rows(8, 16).is_none());
    assert!(packed.rows(48, 17).is_none());
    assert!(packed.rows(48, 16).is_some());
    assert_eq!(packed.bytes(), 2 * 2 * 64 * 16, "two bf16 copies of an aligned weight");
}

#[test]
fn the_bf16_head_matches_the_f32_head_on_bf16_operands() {
    // Hidden states and weights that bf16 holds exactly: the logits are then the f32 head's
    // up to accumulation order; dh rounds the softmax gradient to bf16 (8 bits).
    let (n, vocab, d) = (40, 1000, 48);
    let h = rounded(&values(n * d, 0.5));
    let w = rounded(&values(vocab * d, 0.9).iter().map(|v| v * 0.2).collect::<Vec<_>>());
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % vocab as u32).collect();
    let packed = PackedBf16::new(&w, vocab, d);
    let run = |head: Head<'_>| {
        let mut dh = vec![f32::NAN; n * d];
        let loss = head_loss::forward_backward(&h, head, vocab, &targets, Some(&mut dh), &mut HeadScratch::default());
        (loss, dh)
    };
    let (want_loss, want_dh) = run(Head::F32(&w));
    let (loss, dh) = run(Head::Bf16(packed.full()));
    assert!(((loss - want_loss) / want_loss).abs() < 1e-6, "loss {loss} vs {want_loss}");
    let e = rel_err(&dh, &want_dh);
    assert!(e < 1e-2, "dh off by {e}");
}
