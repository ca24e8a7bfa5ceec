//! Learning-rate schedules of transformers (`get_*_schedule_with_warmup`): the k-th update
//! (0-based) uses `peak · λ(k)`, so the very first update runs at learning rate 0.

/// `linear`, `cosine` or `constant` decay after a linear warm-up.
pub fn lr_at(kind: &str, peak: f64, warmup: usize, total: usize, k: usize) -> f64 {
    if k < warmup {
        return peak * k as f64 / warmup.max(1) as f64;
    }
    let progress = (k - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let factor = match kind {
        "cosine" => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        "constant" => 1.0,
        _ => ((total as f64 - k as f64) / (total.saturating_sub(warmup)).max(1) as f64).max(0.0),
    };
    peak * factor
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn matches_the_demo_reference_schedule() {
        // demo/README.md: warmup 20, 324 steps, peak 0.002; "lr of the block's last update".
        let lr = |k| lr_at("linear", 0.002, 20, 324, k);
        assert_eq!(lr(0), 0.0);
        assert!((lr(9) - 9.0e-4).abs() < 1e-12);
        assert!((lr(19) - 1.9e-3).abs() < 1e-12);
        assert!((lr(29) - 1.941e-3).abs() < 1e-6);
        assert!((lr(323) - 6.579e-6).abs() < 1e-9);
        assert!((lr_at("cosine", 1.0, 0, 100, 50) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at("constant", 1.0, 10, 100, 90), 1.0);
    }
}
