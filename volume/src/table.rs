//! What `volume list` and `volume describe` print.

use serde_json::Value;

/// Rows under headers, columns padded to their widest cell (or a minimum), two spaces apart,
/// trailing blanks trimmed.
pub struct Table {
    pub headers: Vec<&'static str>,
    pub min_width: Vec<usize>,
    pub rows: Vec<Vec<String>>,
    pub indent: &'static str,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            min_width: vec![0; headers.len()],
            rows: Vec::new(),
            indent: "",
        }
    }

    pub fn render(&self) -> String {
        let mut width: Vec<usize> = self
            .headers
            .iter()
            .zip(&self.min_width)
            .map(|(h, m)| h.len().max(*m))
            .collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let out: Vec<String> = cells
                .iter()
                .zip(&width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("{}{}", self.indent, out.join("  ").trim_end()) + "\n"
        };
        let mut text = line(self.headers.clone());
        for r in &self.rows {
            text += &line(r.iter().map(String::as_str).collect());
        }
        text
    }
}

/// 134 → "2m14s", 45 → "45s", 3700 → "1h1m", 90000 → "1d1h".
pub fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// A mirror's `resync` object (bdev_mirror_get_mirrors) as "63% (41 MiB/s, ETA 12s)".
pub fn resync_progress(r: &Value) -> String {
    if r.is_null() {
        return String::new();
    }
    let pct = r["percent"].as_f64().unwrap_or(0.0).floor() as u64;
    let rate = r["rate_bytes_per_sec"].as_u64().unwrap_or(0);
    let mut detail = Vec::new();
    if rate > 0 {
        detail.push(format!("{} MiB/s", rate.div_ceil(1 << 20)));
    }
    if let Some(eta) = r["eta_sec"].as_u64() {
        detail.push(format!("ETA {}", age(eta)));
    }
    if r["full"].as_bool() == Some(true) {
        detail.push("full".into());
    }
    if detail.is_empty() {
        format!("{pct}%")
    } else {
        format!("{pct}% ({})", detail.join(", "))
    }
}

/// `volume describe`'s text for one mirror (an element of `bdev_mirror_get_mirrors`).
pub fn describe(mirror: &Value) -> Result<String, String> {
    let plexes = mirror["plexes"]
        .as_array()
        .ok_or_else(|| format!("the mirror's description has no plexes: {mirror}"))?;
    let mut t = Table::new(&[
        "NAME",
        "NODES",
        "STATE",
        "CONDITION",
        "OUT-OF-SYNC-AGE",
        "RESYNC-PROGRESS",
        "DELETE-PROGRESS",
    ]);
    t.indent = "  ";
    // Room for the usual `NAME.p<i>` without the columns moving as names vary.
    t.min_width[0] = 9;
    for p in plexes {
        let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
        t.rows.push(vec![
            s("name"),
            s("node"),
            s("state"),
            s("condition"),
            p["out_of_sync_age_sec"]
                .as_u64()
                .map(age)
                .unwrap_or_default(),
            resync_progress(&p["resync"]),
            // The mirror reports no progress of a plex being removed yet (it drops such a
            // plex from the list at once); the column is kept so scripts see a stable shape.
            p["delete_progress"].as_str().unwrap_or("").to_string(),
        ]);
    }
    let n = |k: &str| {
        mirror[k]
            .as_u64()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    };
    Ok(format!(
        "Plexes:\n{}Scheduled Plexes / Actual Plexes: {}/{}\n",
        t.render(),
        n("scheduled_plexes"),
        n("actual_plexes")
    ))
}

/// Whether any plex of the mirror is being resynced.
pub fn resync_running(mirror: &Value) -> bool {
    mirror["plexes"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["condition"] == "Resyncing"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn describe_prints_the_documented_shape() {
        let m = json!({
            "name": "vol1", "scheduled_plexes": 2, "actual_plexes": 2,
            "plexes": [
                {"name": "vol1.p0", "node": "n2", "state": "Up", "condition": "InUse",
                 "out_of_sync_age_sec": null, "resync": null},
                {"name": "vol1.p1", "node": "n3", "state": "Up", "condition": "Resyncing",
                 "out_of_sync_age_sec": 134,
                 "resync": {"full": false, "percent": 63.4, "rate_bytes_per_sec": 41 << 20,
                            "eta_sec": 12}},
            ]
        });
        let want = "\
Plexes:
  NAME       NODES  STATE  CONDITION  OUT-OF-SYNC-AGE  RESYNC-PROGRESS          DELETE-PROGRESS
  vol1.p0    n2     Up     InUse
  vol1.p1    n3     Up     Resyncing  2m14s            63% (41 MiB/s, ETA 12s)
Scheduled Plexes / Actual Plexes: 2/2
";
        assert_eq!(describe(&m).unwrap(), want);
        assert!(resync_running(&m));
    }

    #[test]
    fn a_down_plex_and_a_degraded_count() {
        let m = json!({
            "scheduled_plexes": 2, "actual_plexes": 1,
            "plexes": [
                {"name": "v.p0", "node": "n1", "state": "Down", "condition": "Faulted",
                 "out_of_sync_age_sec": 5, "resync": null},
                {"name": "v.p1", "node": "n2", "state": "Up", "condition": "InUse"},
            ]
        });
        let text = describe(&m).unwrap();
        assert!(
            text.contains("  v.p0       n1     Down   Faulted    5s\n"),
            "{text}"
        );
        assert!(
            text.ends_with("Scheduled Plexes / Actual Plexes: 2/1\n"),
            "{text}"
        );
        assert!(!resync_running(&m));
        assert!(describe(&json!({"name": "x"})).is_err());
    }

    #[test]
    fn ages_and_progress() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(134), "2m14s");
        assert_eq!(age(3700), "1h1m");
        assert_eq!(age(90000), "1d1h");
        assert_eq!(resync_progress(&Value::Null), "");
        assert_eq!(resync_progress(&json!({"percent": 7.9})), "7%");
        assert_eq!(
            resync_progress(&json!({"percent": 100.0, "full": true, "rate_bytes_per_sec": 1})),
            "100% (1 MiB/s, full)"
        );
    }
}
