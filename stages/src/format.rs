//! Numbers as people read them, the same in every stage's tables, summaries and the report.

/// An integer with thousands separators: "1,199,882".
pub fn group_thousands(n: impl Into<i128>) -> String {
    let n: i128 = n.into();
    let digits = n.unsigned_abs().to_string();
    let mut out = String::from(if n < 0 { "-" } else { "" });
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A count with thousands separators: "60,000".
pub fn count(n: usize) -> String {
    group_thousands(n as u64)
}

/// A JSON number: integers whole (grouped by thousands), others to 4 decimals (tiny ones in
/// e-form).
pub fn json_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return group_thousands(i);
    }
    if let Some(u) = n.as_u64() {
        return group_thousands(u);
    }
    let v = n.as_f64().unwrap_or(f64::NAN);
    if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// A learning rate as the seed study writes it: "1.0", "0.1", "1e-4", "2.5e-3".
pub fn learning_rate(lr: f64) -> String {
    if lr != 0.0 && lr.abs() < 0.01 {
        format!("{lr:e}")
    } else {
        format!("{lr:?}")
    }
}

/// A fraction as a percentage with two decimals: "91.34%".
pub fn percent(fraction: f64) -> String {
    format!("{:.2}%", 100.0 * fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_the_study_writes_them() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(300), "300");
        assert_eq!(count(60_000), "60,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(group_thousands(-1_199_882), "-1,199,882");
        assert_eq!(learning_rate(1.0), "1.0");
        assert_eq!(learning_rate(0.1), "0.1");
        assert_eq!(learning_rate(1e-4), "1e-4");
        assert_eq!(learning_rate(2.5e-3), "2.5e-3");
        assert_eq!(percent(0.9134), "91.34%");
        assert_eq!(
            json_number(&serde_json::Number::from(1_199_882)),
            "1,199,882"
        );
        assert_eq!(
            json_number(&serde_json::Number::from_f64(0.25).unwrap()),
            "0.2500"
        );
    }
}
