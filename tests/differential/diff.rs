//! A unified-style line diff (longest common subsequence; transcripts are small).

/// One line of an edit script.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Edit {
    Same(usize, usize),
    Del(usize),
    Add(usize),
}

fn edits(a: &[String], b: &[String]) -> Vec<Edit> {
    // Common prefix and suffix first: most transcripts differ in a few places.
    let pre = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suf = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    let (n, m) = (am.len(), bm.len());
    // lcs[i][j]: LCS length of am[i..] and bm[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if am[i] == bm[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out: Vec<Edit> = (0..pre).map(|i| Edit::Same(i, i)).collect();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && am[i] == bm[j] {
            out.push(Edit::Same(pre + i, pre + j));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(Edit::Del(pre + i));
            i += 1;
        } else {
            out.push(Edit::Add(pre + j));
            j += 1;
        }
    }
    out.extend((0..suf).map(|k| Edit::Same(a.len() - suf + k, b.len() - suf + k)));
    out
}

/// `None` when equal; else a unified-style diff (`-` lines only in `a`, `+` only in `b`,
/// `context` lines around each change, `@@ -A +B @@` hunk headers with 1-based line
/// numbers), at most `max_lines` lines of it.
pub fn unified(
    a_name: &str,
    a: &[String],
    b_name: &str,
    b: &[String],
    context: usize,
    max_lines: usize,
) -> Option<String> {
    if a == b {
        return None;
    }
    let e = edits(a, b);
    let changed: Vec<usize> = (0..e.len())
        .filter(|&k| !matches!(e[k], Edit::Same(..)))
        .collect();
    // Hunks: runs of edits whose changes are at most 2 * context apart.
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &k in &changed {
        let start = k.saturating_sub(context);
        let end = (k + context + 1).min(e.len());
        match hunks.last_mut() {
            Some(h) if start <= h.1 => h.1 = end,
            _ => hunks.push((start, end)),
        }
    }
    // Lines of `a` and of `b` before each edit, for the hunk headers.
    let mut before = Vec::with_capacity(e.len());
    let (mut na, mut nb) = (0, 0);
    for edit in &e {
        before.push((na, nb));
        match edit {
            Edit::Same(..) => {
                na += 1;
                nb += 1;
            }
            Edit::Del(_) => na += 1,
            Edit::Add(_) => nb += 1,
        }
    }
    let mut out = vec![format!("--- {a_name}"), format!("+++ {b_name}")];
    let mut truncated = false;
    'hunks: for (start, end) in hunks {
        let (ai, bi) = before[start];
        out.push(format!("@@ -{} +{} @@", ai + 1, bi + 1));
        for edit in &e[start..end] {
            if out.len() >= max_lines {
                truncated = true;
                break 'hunks;
            }
            out.push(match *edit {
                Edit::Same(x, _) => format!(" {}", a[x]),
                Edit::Del(x) => format!("-{}", a[x]),
                Edit::Add(y) => format!("+{}", b[y]),
            });
        }
    }
    if truncated {
        out.push("... (diff truncated)".into());
    }
    Some(out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn equal_is_none_and_changes_show_with_context() {
        assert_eq!(
            unified("a", &lines("x y"), "b", &lines("x y"), 1, 100),
            None
        );
        let d = unified(
            "direct",
            &lines("1 2 3 4 5 6 7 8 9"),
            "pgway",
            &lines("1 2 3 X 5 6 7 8 9 10"),
            1,
            100,
        )
        .unwrap();
        assert_eq!(
            d,
            "--- direct\n+++ pgway\n@@ -3 +3 @@\n 3\n-4\n+X\n 5\n@@ -9 +9 @@\n 9\n+10"
        );
    }

    #[test]
    fn long_diffs_are_truncated() {
        let a: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let b: Vec<String> = (0..100).map(|i| format!("x{i}")).collect();
        let d = unified("a", &a, "b", &b, 3, 10).unwrap();
        assert_eq!(d.lines().count(), 11);
        assert!(d.ends_with("... (diff truncated)"));
    }
}
