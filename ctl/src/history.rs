//! What the parameter's history says: which records ctl wrote and why, which releases were
//! compensated (rolled back), and so which release `ctl rollback` returns to. Pure.
//!
//! ctl marks its records with two metadata fields of the release record (kept verbatim by the
//! agent, which ignores them): `"kind"` (`release`, `rollback` or `compensation`) and, on a
//! compensation, `"compensates"`: the parameter version of the release it undid.

use std::collections::HashSet;

use serde_json::Value;
use skiff_release::{Release, Tag};

use crate::store::Stored;
use crate::trust::Signer;

pub const KIND: &str = "kind";
pub const COMPENSATES: &str = "compensates";

/// Why ctl wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ctl release`.
    Release,
    /// `ctl rollback`: an earlier release again, on purpose.
    Rollback,
    /// Put back by ctl because the release at version `compensates` failed or was stopped.
    Compensation { compensates: i64 },
}

impl Kind {
    /// Mark `release` with this kind.
    pub fn mark(self, release: &mut Release) {
        let (kind, compensates) = match self {
            Kind::Release => ("release", None),
            Kind::Rollback => ("rollback", None),
            Kind::Compensation { compensates } => ("compensation", Some(compensates)),
        };
        release.metadata.insert(KIND.into(), Value::from(kind));
        match compensates {
            Some(v) => {
                release.metadata.insert(COMPENSATES.into(), Value::from(v));
            }
            None => {
                release.metadata.remove(COMPENSATES);
            }
        }
    }
}

/// The version a record compensates, if it is a compensation.
pub fn compensates(release: &Release) -> Option<i64> {
    release.metadata.get(COMPENSATES).and_then(Value::as_i64)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "tag {tag} is not in the release history (`ctl history`); release it with `ctl release --tag {tag}`"
    )]
    UnknownTag { tag: Tag },
    #[error(
        "every release of tag {tag} in the history was rolled back (version {version}); if you are sure, release it again with `ctl release --tag {tag}`"
    )]
    RolledBack { tag: Tag, version: i64 },
    #[error(
        "no earlier release that completed in the parameter history to roll back to; name one with `ctl release --tag`"
    )]
    NoEarlier,
}

/// The release `ctl rollback` returns to, from the history newest first: with `to`, the
/// newest record of that tag that was not rolled back; without, the newest record that was
/// not rolled back and whose tag differs from the current one. A record counts as rolled back
/// when a later compensation names its version.
pub fn rollback_target(history: &[Stored], to: Option<&Tag>) -> Result<Release, TargetError> {
    let undone: HashSet<i64> = history
        .iter()
        .filter_map(|s| s.release.as_ref().and_then(compensates))
        .collect();
    let current = history.first().and_then(|s| s.release.as_ref());
    let good = |s: &&Stored| !undone.contains(&s.version);
    let releases = || history.iter().filter(|s| s.release.is_some());
    let found = match to {
        Some(tag) => {
            let mut of_tag =
                releases().filter(|s| s.release.as_ref().is_some_and(|r| &r.tag == tag));
            let newest = of_tag.clone().next();
            match (of_tag.find(good), newest) {
                (Some(s), _) => s,
                (None, Some(s)) => {
                    return Err(TargetError::RolledBack {
                        tag: tag.clone(),
                        version: s.version,
                    });
                }
                (None, None) => return Err(TargetError::UnknownTag { tag: tag.clone() }),
            }
        }
        None => {
            let current = current.ok_or(TargetError::NoEarlier)?;
            releases()
                .filter(|s| s.release.as_ref().is_some_and(|r| r.tag != current.tag))
                .find(good)
                .ok_or(TargetError::NoEarlier)?
        }
    };
    found.release.clone().ok_or(TargetError::NoEarlier)
}

/// The table `ctl history` prints, newest first as given: version, tag, when and by whom (the
/// record's own stamp, else the parameter history's), what kind of write it was, who signed it
/// when `signers` (one per record, see [`crate::trust::signers`]) says, the digest; then why
/// a signature is unknown or refused, once per reason. Pure.
pub fn render(history: &[Stored], signers: &[Option<Signer>]) -> String {
    use std::fmt::Write;
    let signed = signers.iter().any(Option::is_some);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>7}  {:<20}  {:<25}  {:<12}  {:<14}  {}DIGEST",
        "VERSION",
        "TAG",
        "RELEASED AT",
        "BY",
        "KIND",
        if signed {
            format!("{:<24}  ", "SIGNED BY")
        } else {
            String::new()
        }
    );
    let mut notes: Vec<String> = Vec::new();
    for (i, h) in history.iter().enumerate() {
        let (tag, digest, at, by, kind) = match &h.release {
            Some(r) => (
                r.tag.to_string(),
                r.digest.as_ref().map_or("-".into(), ToString::to_string),
                r.meta_str("released_at")
                    .map(str::to_owned)
                    .or(h.modified_at.clone()),
                r.meta_str("released_by")
                    .map(str::to_owned)
                    .or(h.modified_by.clone()),
                match (r.meta_str(KIND), compensates(r)) {
                    (Some(k), Some(v)) => format!("{k} of v{v}"),
                    (Some(k), None) => k.to_owned(),
                    (None, _) => "-".into(),
                },
            ),
            None => (
                skiff_release::quote(&h.value),
                "(not a release)".into(),
                h.modified_at.clone(),
                h.modified_by.clone(),
                "-".into(),
            ),
        };
        let signer = signers.get(i).and_then(Option::as_ref);
        if let Some(note @ (Signer::Unknown { .. } | Signer::Refused { .. })) = signer {
            let note = format!("signature {note}");
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
        let _ = writeln!(
            s,
            "{:>7}  {:<20}  {:<25}  {:<12}  {:<14}  {}{digest}",
            h.version,
            tag,
            at.unwrap_or_else(|| "-".into()),
            by.unwrap_or_else(|| "-".into()),
            kind,
            if signed {
                format!("{:<24}  ", signer.map_or("-", Signer::cell))
            } else {
                String::new()
            }
        );
    }
    for n in notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored record: version, tag, and the version it compensates.
    fn rec(version: i64, tag: &str, comp: Option<i64>) -> Stored {
        let mut r = Release::new(tag.parse().expect("tag"), None);
        // Distinct records, so the chosen one can be found by value.
        r.metadata.insert("n".into(), Value::from(version));
        if let Some(c) = comp {
            Kind::Compensation { compensates: c }.mark(&mut r);
        }
        Stored {
            version,
            value: r.to_value(),
            release: Some(r),
            modified_at: None,
            modified_by: None,
        }
    }

    fn junk(version: i64) -> Stored {
        Stored {
            version,
            value: "not a release {".into(),
            release: None,
            modified_at: None,
            modified_by: None,
        }
    }

    #[test]
    fn rollback_target_table() {
        // History newest first; (name, history, --to, want tag and version of the chosen record).
        type Row = (
            &'static str,
            Vec<Stored>,
            Option<&'static str>,
            Result<(&'static str, i64), &'static str>,
        );
        let table: Vec<Row> = vec![
            (
                "previous release",
                vec![rec(3, "v3", None), rec(2, "v2", None), rec(1, "v1", None)],
                None,
                Ok(("v2", 2)),
            ),
            (
                "after a compensated release: the one before, not the failed one",
                vec![
                    rec(4, "x", Some(3)),
                    rec(3, "b", None),
                    rec(2, "x", None),
                    rec(1, "w", None),
                ],
                None,
                Ok(("w", 1)),
            ),
            (
                "re-releases of the current tag are skipped",
                vec![rec(3, "v2", None), rec(2, "v2", None), rec(1, "v1", None)],
                None,
                Ok(("v1", 1)),
            ),
            (
                "unparseable values are skipped",
                vec![rec(3, "v3", None), junk(2), rec(1, "v1", None)],
                None,
                Ok(("v1", 1)),
            ),
            (
                "only the failed release before the current",
                vec![rec(3, "x", Some(2)), rec(2, "b", None), rec(1, "x", None)],
                None,
                Err("no earlier release"),
            ),
            ("empty history", vec![], None, Err("no earlier release")),
            (
                "--to picks the newest of that tag",
                vec![
                    rec(4, "v3", None),
                    rec(3, "v1", None),
                    rec(2, "v2", None),
                    rec(1, "v1", None),
                ],
                Some("v1"),
                Ok(("v1", 3)),
            ),
            (
                "--to skips a rolled-back record of that tag",
                vec![
                    rec(5, "v1", Some(4)),
                    rec(4, "v2", None),
                    rec(3, "v1", None),
                    rec(2, "v2", None),
                ],
                Some("v2"),
                Ok(("v2", 2)),
            ),
            (
                "--to a tag only ever rolled back",
                vec![
                    rec(3, "v1", Some(2)),
                    rec(2, "v2", None),
                    rec(1, "v1", None),
                ],
                Some("v2"),
                Err("was rolled back (version 2)"),
            ),
            (
                "--to an unknown tag",
                vec![rec(1, "v1", None)],
                Some("v9"),
                Err("not in the release history"),
            ),
        ];
        for (name, history, to, want) in table {
            let to = to.map(|t| t.parse::<Tag>().expect("tag"));
            let got = rollback_target(&history, to.as_ref());
            match (got, want) {
                (Ok(r), Ok((tag, version))) => {
                    assert_eq!(r.tag.as_str(), tag, "{name}");
                    let chosen = history
                        .iter()
                        .find(|s| s.release.as_ref() == Some(&r))
                        .expect("from the history");
                    assert_eq!(chosen.version, version, "{name}");
                }
                (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn marks_survive_the_contract_parse() {
        let mut r = Release::new("v1".parse().expect("tag"), None);
        Kind::Compensation { compensates: 7 }.mark(&mut r);
        let back = Release::parse(&r.to_value()).expect("the agent's parser accepts it");
        assert_eq!(compensates(&back), Some(7));
        assert_eq!(back.meta_str(KIND), Some("compensation"));
        assert!(back.same_version(&Release::parse("v1").expect("bare tag")));
        Kind::Rollback.mark(&mut r);
        assert_eq!(compensates(&r), None);
    }

    #[test]
    fn render_names_each_write() {
        let mut released = rec(2, "v2", None);
        if let Some(r) = released.release.as_mut() {
            Kind::Release.mark(r);
        }
        let text = render(&[rec(3, "v1", Some(2)), released, junk(1)], &[]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("KIND"), "{text}");
        assert!(
            !lines[0].contains("SIGNED BY"),
            "no keys, no column: {text}"
        );
        assert!(
            lines[1].contains("v1") && lines[1].contains("compensation of v2"),
            "{text}"
        );
        assert!(
            lines[2].contains("v2") && lines[2].contains("  release  "),
            "{text}"
        );
        assert!(lines[3].contains("(not a release)"), "{text}");
    }

    #[test]
    fn render_shows_the_signer_of_each_record_and_each_reason_once() {
        let history = [
            rec(4, "v4", None),
            rec(3, "v3", None),
            rec(2, "v2", None),
            junk(1),
        ];
        let down = || Signer::Unknown {
            why: "cannot reach the registry".into(),
        };
        // (name, signers, per data line: the SIGNED BY cell, the notes after the table)
        type Row = (
            &'static str,
            Vec<Option<Signer>>,
            [&'static str; 4],
            Vec<&'static str>,
        );
        let table: Vec<Row> = vec![
            (
                "signed, refused, unknown",
                vec![
                    Some(Signer::Signed {
                        key_id: "SHA256:00112233aabbccdd".into(),
                    }),
                    Some(Signer::Refused {
                        reason: "no signature for sha256:..".into(),
                    }),
                    Some(down()),
                    None,
                ],
                ["SHA256:00112233aabbccdd", "UNTRUSTED", "unknown", "-"],
                vec![
                    "note: signature NOT signed by a trusted key: no signature for",
                    "note: signature unknown: cannot reach the registry",
                ],
            ),
            (
                "the registry down for all: one note",
                vec![Some(down()), Some(down()), Some(down()), None],
                ["unknown", "unknown", "unknown", "-"],
                vec!["note: signature unknown: cannot reach the registry"],
            ),
        ];
        for (name, signers, cells, notes) in table {
            let text = render(&history, &signers);
            let lines: Vec<&str> = text.lines().collect();
            assert!(lines[0].contains("SIGNED BY"), "{name}: {text}");
            for (line, cell) in lines[1..5].iter().zip(cells) {
                assert!(
                    line.contains(&format!("  {cell} ")),
                    "{name}: {cell} in {line}"
                );
            }
            assert_eq!(lines.len(), 5 + notes.len(), "{name}: {text}");
            for (line, note) in lines[5..].iter().zip(notes) {
                assert!(line.starts_with(note), "{name}: {note} in {line}");
            }
        }
    }
}
