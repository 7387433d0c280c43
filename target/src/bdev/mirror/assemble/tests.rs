use super::*;
use crate::bdev::mirror::superblock::PlexRecord;

fn sb(
    name: &str,
    uuid: Uuid,
    this: Uuid,
    gen: u64,
    table: &[(Uuid, PlexState)],
    clean: bool,
) -> Found {
    let layout = Layout::new(512, 1 << 20, 1 << 20).unwrap();
    let plexes = table
        .iter()
        .enumerate()
        .map(|(i, (u, s))| PlexRecord {
            uuid: *u,
            node: String::new(),
            location: format!("p{i}"),
            state: *s,
            in_sync_generation: 1,
        })
        .collect();
    let mut s = Superblock::new(uuid, name, this, &layout, plexes).unwrap();
    s.generation = gen;
    for r in &mut s.plexes {
        r.in_sync_generation = gen;
    }
    s.clean = clean;
    Found::Ours(Box::new(s))
}

#[test]
fn copies_of_in_sync_plexes_become_a_new_mirror_and_anything_else_is_refused() {
    let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let table = [(a, PlexState::InSync), (b, PlexState::InSync)];
    let copy = |this| sb("vol1", m, this, 9, &table, false);
    let opts = AssembleOpts {
        copy_of: Some("vol1".into()),
        ..Default::default()
    };
    let found = vec![("c0".to_string(), copy(a)), ("c1".to_string(), copy(b))];
    let plan = plan("vol2", &opts, &found).unwrap();
    assert!(
        plan.new && plan.uuid != m && plan.generation == 1,
        "{plan:?}"
    );
    assert!(plan
        .plexes
        .iter()
        .all(|p| p.condition == Condition::InUse && p.uuid != a && p.uuid != b));

    let refused = |found: Vec<(String, Found)>, why: &str| {
        let e = super::plan("vol2", &opts, &found).unwrap_err();
        assert!(e.contains(why), "{e}");
    };
    refused(
        vec![("c0".into(), copy(a)), ("c1".into(), Found::Blank)],
        "holds no superblock",
    );
    refused(
        vec![("c0".into(), sb("other", m, a, 9, &table, false))],
        "not a copy of \"vol1\"",
    );
    let behind = [(a, PlexState::InSync), (b, PlexState::New)];
    refused(
        vec![("c1".into(), sb("vol1", m, b, 9, &behind, false))],
        "was not in sync",
    );
    refused(
        vec![
            ("c0".into(), copy(a)),
            ("c1".into(), sb("vol1", Uuid::new_v4(), b, 9, &table, false)),
        ],
        "copies of different mirrors",
    );
}

fn lenient() -> AssembleOpts {
    AssembleOpts {
        allow_degraded: true,
        ..Default::default()
    }
}

#[test]
fn a_missing_plex_offered_under_another_name_is_known_by_its_node() {
    let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let t = [(a, PlexState::InSync), (b, PlexState::InSync)];
    // The table as n2 (the old owner) wrote it: its own plex p0 local, n3's p1.
    let mut on_b = sb("m", m, b, 3, &t, false);
    if let Found::Ours(s) = &mut on_b {
        s.plexes[0].node = "n2".into();
        s.plexes[1].node = "n3".into();
    }
    // n3 assembles with n2 down: n2's plex is offered as the namespace it will come back as.
    let missing = |node: &str| Found::Missing { node: node.into() };
    let found = [("p0n1".into(), missing("n2")), ("p1".into(), on_b)];
    let p = plan("m", &lenient(), &found).unwrap();
    assert_eq!(p.plexes[0].uuid, a, "{p:?}");
    assert!(p.absent.is_empty(), "{p:?}");
    assert!(
        matches!(p.plexes[0].condition, Condition::Faulted { .. }),
        "{p:?}"
    );
    // Unknown node, or a location no plex has: refused as before.
    let Found::Ours(s) = &found[1].1 else {
        unreachable!()
    };
    for (loc, node) in [("p0n1", "n9"), ("p0n1", "")] {
        let f = [
            (loc.to_string(), missing(node)),
            ("p1".into(), Found::Ours(s.clone())),
        ];
        let e = plan("m", &lenient(), &f).unwrap_err();
        assert!(e.contains("has no plex there"), "{e}");
    }
}

#[test]
fn a_missing_in_sync_plex_stops_assembly_unless_allowed() {
    let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let t = [(a, PlexState::InSync), (b, PlexState::InSync)];
    let found = [
        ("p0".into(), sb("m", m, a, 3, &t, true)),
        (
            "p1".into(),
            Found::Missing {
                node: String::new(),
            },
        ),
    ];
    let e = plan("m", &AssembleOpts::default(), &found).unwrap_err();
    assert!(e.contains("missing") && e.contains("p1"), "{e}");
    let only = [("p0".into(), sb("m", m, a, 3, &t, true))];
    assert!(
        plan("m", &AssembleOpts::default(), &only).is_err(),
        "not offered is missing too"
    );
    assert!(plan("m", &lenient(), &found).is_ok());
    // A plex already out of sync in the table is not needed.
    let t = [
        (a, PlexState::InSync),
        (b, PlexState::OutOfSync { since_unix_secs: 1 }),
    ];
    let found = [
        ("p0".into(), sb("m", m, a, 3, &t, true)),
        (
            "p1".into(),
            Found::Missing {
                node: String::new(),
            },
        ),
    ];
    assert!(plan("m", &AssembleOpts::default(), &found).is_ok());
}

#[test]
fn blank_plexes_make_a_new_mirror_all_in_sync() {
    let p = plan(
        "m",
        &AssembleOpts::default(),
        &[("a".into(), Found::Blank), ("b".into(), Found::Blank)],
    )
    .unwrap();
    assert!(p.new && p.plexes.iter().all(|x| x.condition == Condition::InUse));
}

#[test]
fn the_newest_generation_wins_and_a_stale_plex_is_resynced() {
    let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let found = [
        (
            "p0".into(),
            sb(
                "m",
                m,
                a,
                7,
                &[
                    (a, PlexState::InSync),
                    (b, PlexState::OutOfSync { since_unix_secs: 5 }),
                ],
                true,
            ),
        ),
        (
            "p1".into(),
            sb(
                "m",
                m,
                b,
                5,
                &[(a, PlexState::InSync), (b, PlexState::InSync)],
                true,
            ),
        ),
    ];
    let p = plan("m", &lenient(), &found).unwrap();
    assert_eq!((p.generation, p.sources.clone()), (7, vec![0]));
    assert!(matches!(
        p.plexes[1].condition,
        Condition::OutOfSync {
            why: Behind::StaleGeneration { had: 5, newest: 7 },
            ..
        }
    ));
    assert!(p.notes.iter().any(|n| n.contains("stale")), "{:?}", p.notes);
}

#[test]
fn a_stale_plex_alone_is_refused() {
    let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // b's own superblock still says both in sync, but at generation 5; a moved to 7
    // without b (b missed writes). Offered alone, b must not be used.
    let found = [(
        "p1".into(),
        sb(
            "m",
            m,
            b,
            5,
            &[(a, PlexState::InSync), (b, PlexState::InSync)],
            true,
        ),
    )];
    // Alone, b is the newest it can see: that is allowed (it cannot know of generation 7).
    assert!(plan("m", &lenient(), &found).is_ok());
    let found = [
        (
            "p1".into(),
            sb(
                "m",
                m,
                b,
                5,
                &[(a, PlexState::InSync), (b, PlexState::InSync)],
                true,
            ),
        ),
        (
            "p0".into(),
            Found::Missing {
                node: String::new(),
            },
        ),
    ];
    assert!(
        plan("m", &lenient(), &found).is_ok(),
        "p0 missing, b is the newest seen"
    );
    let found = [(
        "p1".into(),
        sb(
            "m",
            m,
            b,
            7,
            &[
                (a, PlexState::InSync),
                (b, PlexState::OutOfSync { since_unix_secs: 1 }),
            ],
            true,
        ),
    )];
    let e = plan("m", &lenient(), &found).unwrap_err();
    assert!(e.contains("stale"), "{e}");
    // Alone but older than the generation the caller knows of: refused.
    let found = [(
        "p1".into(),
        sb(
            "m",
            m,
            b,
            5,
            &[(a, PlexState::InSync), (b, PlexState::InSync)],
            true,
        ),
    )];
    let e = plan(
        "m",
        &AssembleOpts {
            min_generation: 6,
            ..lenient()
        },
        &found,
    )
    .unwrap_err();
    assert!(e.contains("stale"), "{e}");
}

#[test]
fn foreign_and_renamed_plexes_are_refused() {
    let (m1, m2, a, b) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let found = [
        (
            "p0".into(),
            sb("m", m1, a, 1, &[(a, PlexState::InSync)], true),
        ),
        (
            "p1".into(),
            sb("m", m2, b, 1, &[(b, PlexState::InSync)], true),
        ),
    ];
    assert!(plan("m", &lenient(), &found)
        .unwrap_err()
        .contains("different mirrors"));
    let found = [(
        "p0".into(),
        sb("other", m1, a, 1, &[(a, PlexState::InSync)], true),
    )];
    assert!(plan("m", &lenient(), &found)
        .unwrap_err()
        .contains("belongs to mirror \"other\""));
    let found = [(
        "p0".into(),
        sb("m", m1, a, 1, &[(a, PlexState::InSync)], true),
    )];
    assert!(plan(
        "m",
        &AssembleOpts {
            uuid: Some(m2),
            ..lenient()
        },
        &found
    )
    .is_err());
}

#[test]
fn after_an_unclean_shutdown_one_source_serves_and_the_others_resync() {
    let (m, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let t = [(a, PlexState::InSync), (b, PlexState::InSync)];
    let found = [
        ("p0".into(), sb("m", m, a, 3, &t, false)),
        ("p1".into(), sb("m", m, b, 3, &t, false)),
    ];
    let p = plan("m", &lenient(), &found).unwrap();
    assert_eq!(p.plexes[0].condition, Condition::InUse);
    assert!(matches!(
        p.plexes[1].condition,
        Condition::OutOfSync {
            why: Behind::UncleanShutdown,
            ..
        }
    ));
    let found = [
        ("p0".into(), sb("m", m, a, 3, &t, true)),
        ("p1".into(), sb("m", m, b, 3, &t, true)),
    ];
    assert!(plan("m", &lenient(), &found)
        .unwrap()
        .plexes
        .iter()
        .all(|x| x.condition == Condition::InUse));
}

#[test]
fn a_blank_plex_beside_a_mirror_gets_a_full_copy() {
    let (m, a) = (Uuid::new_v4(), Uuid::new_v4());
    let found = [
        (
            "p0".into(),
            sb("m", m, a, 2, &[(a, PlexState::InSync)], true),
        ),
        ("p1".into(), Found::Blank),
    ];
    let p = plan("m", &lenient(), &found).unwrap();
    assert!(matches!(
        p.plexes[1].condition,
        Condition::OutOfSync {
            why: Behind::New,
            ..
        }
    ));
}
