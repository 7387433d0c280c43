//! The `bdevperf` binary as a whole: it loads a config, runs I/O into the bdevs it creates and
//! prints SPDK bdevperf's table; bad options and bad configs end it with a message naming the
//! problem and a non-zero status. No timing is asserted: only that I/O was done and that the
//! figures agree with each other.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BDEVPERF: &str = env!("CARGO_BIN_EXE_bdevperf");

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bdevperf-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// Writes `text` to `dir/name`.
fn config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn malloc_config(dir: &Path) -> PathBuf {
    config(
        dir,
        "bdevs.json",
        r#"{"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 16384, "block_size": 512}},
            {"method": "bdev_null_create",
             "params": {"name": "Null0", "num_blocks": 4096, "block_size": 4096}}]}]}"#,
    )
}

/// Runs bdevperf unpinned (tests share the machine) with `args`.
fn bdevperf(args: &[&str]) -> Output {
    Command::new(BDEVPERF)
        .arg("--no-pin")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("bdevperf runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One row of the table: its name and its figures (runtime, IOPS, MiB/s, Fail/s, TO/s,
/// average, min, max; the Total row has no runtime).
#[derive(Debug)]
struct Row {
    name: String,
    figures: Vec<f64>,
}

/// The job rows and the Total row, as a script would read them (`awk '$1 == "Total"'`).
fn table(stdout: &str) -> (Vec<Row>, Row) {
    let row = |line: &str| {
        let (name, rest) = line.split_once(':').expect("a row has a colon");
        Row {
            name: name.trim().to_string(),
            figures: rest
                .split_whitespace()
                .map(|f| f.parse().unwrap_or_else(|_| panic!("{f:?} in {line:?}")))
                .collect(),
        }
    };
    let jobs = stdout
        .lines()
        .filter(|l| l.starts_with("\t "))
        .map(row)
        .collect();
    let total = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Total"))
        .map(row)
        .unwrap_or_else(|| panic!("no Total row in:\n{stdout}"));
    (jobs, total)
}

#[test]
fn runs_one_job_per_bdev_and_prints_spdk_table() {
    let dir = temp_dir();
    let cfg = malloc_config(dir.path());
    let out = bdevperf(&[
        "-c",
        cfg.to_str().unwrap(),
        "-q",
        "8",
        "-o",
        "4k",
        "-w",
        "randread",
        "-t",
        "1",
        "-m",
        "0x1",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "status {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("Running I/O for 1 seconds..."), "{stdout}");
    for name in ["Malloc0", "Null0"] {
        let job =
            format!("Job: {name} (Core Mask 0x1, workload: randread, depth: 8, IO size: 4096)");
        assert!(stdout.contains(&job), "no {job:?} in:\n{stdout}");
    }
    let (jobs, total) = table(&stdout);
    assert_eq!(
        jobs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["Malloc0", "Null0"],
        "{stdout}"
    );
    let mut iops_sum = 0.0;
    for r in &jobs {
        let f = &r.figures;
        assert_eq!(f.len(), 8, "{r:?}");
        let (runtime, iops, mib_s, fails, avg, min, max) =
            (f[0], f[1], f[2], f[3], f[5], f[6], f[7]);
        assert!(runtime > 0.0 && iops > 0.0, "{r:?}");
        // 4 KiB I/O: 256 of them make a MiB (the table rounds to 2 decimals).
        assert!((mib_s * 256.0 - iops).abs() <= 256.0 * 0.01, "{r:?}");
        assert_eq!(fails, 0.0, "{r:?}");
        assert!(min > 0.0 && min <= avg && avg <= max, "{r:?}");
        iops_sum += iops;
    }
    assert_eq!(total.figures.len(), 7, "{total:?}");
    assert!(
        (total.figures[0] - iops_sum).abs() <= 0.01 * jobs.len() as f64,
        "total {total:?}, jobs {jobs:?}"
    );
}

#[test]
fn mixed_workload_on_one_named_bdev() {
    let dir = temp_dir();
    let cfg = malloc_config(dir.path());
    let out = bdevperf(&[
        "-c",
        cfg.to_str().unwrap(),
        "-T",
        "Malloc0",
        "-q",
        "2",
        "-o",
        "8192",
        "-w",
        "rw",
        "-M",
        "70",
        "-t",
        "0.3",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Job: Malloc0 (Core Mask 0x1, workload: rw, percentage: 70, depth: 2"),
        "{stdout}"
    );
    let (jobs, total) = table(&stdout);
    assert_eq!(jobs.len(), 1, "only -T's bdev: {stdout}");
    assert!(total.figures[0] > 0.0, "{stdout}");
}

/// SPDK's bdevperf skips the nvmf section of a target's config; so does ours, and so the
/// namespace in it does not claim the bdev away from the job.
#[test]
fn skips_the_nvmf_section_as_spdk_does() {
    let dir = temp_dir();
    let cfg = config(
        dir.path(),
        "target.json",
        r#"{"subsystems": [
            {"subsystem": "bdev", "config": [{"method": "bdev_malloc_create",
              "params": {"name": "Malloc0", "num_blocks": 4096, "block_size": 512}}]},
            {"subsystem": "nvmf", "config": [
              {"method": "nvmf_create_subsystem",
               "params": {"nqn": "nqn.2016-06.io.spdk:cnode1", "allow_any_host": true}},
              {"method": "nvmf_subsystem_add_ns",
               "params": {"nqn": "nqn.2016-06.io.spdk:cnode1",
                          "namespace": {"bdev_name": "Malloc0"}}}]}]}"#,
    );
    let out = bdevperf(&[
        "-c",
        cfg.to_str().unwrap(),
        "-q",
        "1",
        "-o",
        "512",
        "-w",
        "write",
        "-t",
        "0.3",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("skipping the nvmf section"), "{stderr}");
    assert!(table(&stdout).1.figures[0] > 0.0, "{stdout}");
}

/// A mirror deeper than its legs' queues: at depth 256 over two uring plexes (128 entries a
/// ring), half of what the mirror has in flight waits in it for room at its legs. Every write
/// must still reach both plexes. The plex files start filled with 0xA5, and bdevperf writes
/// zeroed buffers sequentially from the mirror's first block, so every block the run wrote
/// must read back as zeros on both plexes. (Data starts 1 MiB into a plex of this size:
/// docs/mirror-on-disk-format.md.) The run is short enough for one or two passes, so a lost
/// write is not hidden by later passes over the same block.
#[test]
fn a_mirror_deeper_than_its_legs_queues_writes_every_block_to_both_plexes() {
    const PLEX_BYTES: usize = 128 << 20;
    const DEPTH: usize = 256;
    const DATA_OFFSET: usize = 1 << 20;
    const IO: usize = 4096;
    let dir = temp_dir();
    let files: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dir.path().join(format!("plex{i}.img"));
            std::fs::write(&p, vec![0xa5u8; PLEX_BYTES]).unwrap();
            p
        })
        .collect();
    let cfg = config(
        dir.path(),
        "mirror.json",
        &serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_uring_create",
             "params": {"name": "u0", "filename": files[0], "block_size": 512}},
            {"method": "bdev_uring_create",
             "params": {"name": "u1", "filename": files[1], "block_size": 512}},
            {"method": "bdev_mirror_create", "params": {"name": "m", "plexes": ["u0", "u1"]}}]}]})
        .to_string(),
    );
    let depth = DEPTH.to_string();
    let out = bdevperf(&args_with(
        cfg.to_str().unwrap(),
        &["-q", &depth, "-w", "write", "-t", "0.5"],
    ));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let (jobs, _) = table(&stdout);
    assert_eq!(jobs.len(), 1, "one job, on the mirror: {stdout}");
    let (runtime, iops, fails) = (jobs[0].figures[0], jobs[0].figures[1], jobs[0].figures[3]);
    assert_eq!(fails, 0.0, "{stdout}");
    // The table's figures are rounded: take 90 % of what it says was written, less the depth
    // (writes still in flight when the run ended may leave holes just below the last one).
    let written = ((runtime * iops * 0.9) as usize).saturating_sub(DEPTH);
    // The first burst alone (DEPTH writes, 128 a leg takes) goes through the wait.
    assert!(written >= DEPTH, "too few writes to check: {stdout}");
    let span = (PLEX_BYTES - DATA_OFFSET) / IO;
    let end = DATA_OFFSET + written.min(span) * IO;
    for f in &files {
        let p = std::fs::read(f).unwrap();
        if let Some(i) = p[DATA_OFFSET..end].iter().position(|&b| b != 0) {
            let at = DATA_OFFSET + i;
            panic!(
                "{}: byte {at} (mirror block {}) was not written (0x{:02x}); the run wrote \
                 {written} blocks of {IO} B from the start: {stdout}",
                f.display(),
                (at - DATA_OFFSET) / 512,
                p[at]
            );
        }
    }
}

/// `-c cfg -q 1 -o 4096 -w randread -t 1`, with `changes` replacing those options or added.
fn args_with<'a>(cfg: &'a str, changes: &[&'a str]) -> Vec<&'a str> {
    let mut opts: Vec<(&str, Option<&str>)> = vec![
        ("-c", Some(cfg)),
        ("-q", Some("1")),
        ("-o", Some("4096")),
        ("-w", Some("randread")),
        ("-t", Some("1")),
    ];
    for pair in changes.chunks(2) {
        let (flag, value) = (pair[0], pair.get(1).copied());
        match opts.iter_mut().find(|(f, _)| *f == flag) {
            Some(o) => o.1 = value,
            None => opts.push((flag, value)),
        }
    }
    opts.into_iter()
        .flat_map(|(f, v)| std::iter::once(f).chain(v))
        .collect()
}

/// Bad arguments: clap's status 2 and a message naming the option.
#[test]
fn bad_options_are_refused() {
    let dir = temp_dir();
    let cfg = malloc_config(dir.path());
    let cfg = cfg.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (args_with(cfg, &["-q", "0"]), "--queue-depth"),
        (args_with(cfg, &["-o", "4x"]), "is not a size in bytes"),
        (
            args_with(cfg, &["-w", "verify"]),
            "SPDK bdevperf's, not ours",
        ),
        (args_with(cfg, &["-w", "sideways"]), "unknown workload"),
        (args_with(cfg, &["-t", "0"]), "--time"),
        (args_with(cfg, &["-M", "101", "-w", "rw"]), "--rwmixread"),
        (args_with(cfg, &["--frobnicate"]), "--frobnicate"),
        (
            vec!["-q", "1", "-o", "4096", "-w", "read", "-t", "1"],
            "--config",
        ),
    ];
    for (args, says) in cases {
        let out = bdevperf(&args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}\n{stderr}");
        assert!(stderr.contains(says), "{args:?}: no {says:?} in {stderr}");
        assert!(!stdout.contains("Running I/O"), "{args:?}: {stdout}");
    }
}

/// Configs and combinations that cannot run: status 1 and one line saying why, before any
/// I/O.
#[test]
fn bad_configs_are_refused() {
    let dir = temp_dir();
    let d = dir.path();
    let bdev_section = |calls: &str| {
        format!(r#"{{"subsystems": [{{"subsystem": "bdev", "config": [{calls}]}}]}}"#)
    };
    let good = malloc_config(d);
    let not_json = config(d, "broken.json", r#"{"subsystems": ["#);
    let refused = config(
        d,
        "refused.json",
        &bdev_section(
            r#"{"method": "bdev_malloc_create",
                "params": {"name": "M", "num_blocks": 0, "block_size": 512}}"#,
        ),
    );
    let unknown = config(
        d,
        "unknown.json",
        &bdev_section(r#"{"method": "bdev_frob_create"}"#),
    );
    let tiny = config(
        d,
        "tiny.json",
        &bdev_section(
            r#"{"method": "bdev_malloc_create",
                "params": {"name": "Tiny", "num_blocks": 8, "block_size": 512}}"#,
        ),
    );
    let mirrored = config(
        d,
        "mirrored.json",
        &bdev_section(
            r#"{"method": "bdev_malloc_create",
                "params": {"name": "A", "num_blocks": 4096, "block_size": 512}},
               {"method": "bdev_malloc_create",
                "params": {"name": "B", "num_blocks": 4096, "block_size": 512}},
               {"method": "bdev_mirror_create", "params": {"name": "R0", "plexes": ["A", "B"]}}"#,
        ),
    );
    let empty = config(d, "empty.json", r#"{"subsystems": []}"#);
    let no_subsystems = config(d, "nosub.json", r#"{"bdev": []}"#);
    let missing = d.join("missing.json");
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (good, tiny) = (p(&good), p(&tiny));
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (p(&missing), vec![], "cannot read config"),
        (p(&not_json), vec![], "is not valid JSON"),
        (p(&refused), vec![], "(bdev_malloc_create): num_blocks"),
        (p(&unknown), vec![], "bdev_frob_create"),
        (p(&empty), vec![], "creates no bdev to run I/O on"),
        (p(&no_subsystems), vec![], "subsystems"),
        (good.clone(), vec!["-T", "Nope"], "-T Nope"),
        (
            good.clone(),
            vec!["-o", "1000"],
            "not a multiple of Malloc0's block size 512",
        ),
        (
            good.clone(),
            vec!["-o", "8m"],
            "larger than the largest DMA buffer",
        ),
        (tiny, vec!["-o", "8k"], "larger than Tiny (4096 bytes)"),
        (good.clone(), vec!["-w", "randrw"], "needs -M"),
        (
            p(&mirrored),
            vec!["-T", "A", "-w", "write"],
            "A is claimed by",
        ),
        (good, vec!["-m", "0x0"], "core mask"),
    ];
    for (cfg, changes, says) in &cases {
        let args = args_with(cfg, changes);
        let out = bdevperf(&args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}\n{stderr}");
        // One line of ours says why (a warning from the DMA pool may come before it).
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("bdevperf: ") && l.contains(says)),
            "{args:?}: no \"bdevperf: ...{says}\" line in {stderr}"
        );
        assert!(!stdout.contains("Running I/O"), "{args:?}: {stdout}");
    }
}

/// An lvol sends most I/O to its base re-aimed, without a request of its own: every completion
/// must still name the I/O it was given (bdevperf counts a mismatch as a failure). 12 KiB I/O
/// over 1 MiB clusters: some cross a cluster boundary and take the lvol's other path.
#[test]
fn an_lvol_hands_back_every_io_it_was_given() {
    let dir = temp_dir();
    let cfg = config(
        dir.path(),
        "lvol.json",
        r#"{"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 131072, "block_size": 512}},
            {"method": "bdev_lvol_create_lvstore",
             "params": {"bdev_name": "Malloc0", "lvs_name": "lvs", "cluster_sz": 1048576}},
            {"method": "bdev_lvol_create",
             "params": {"lvol_name": "vol", "size_in_mib": 48, "thin_provision": false,
                        "lvs_name": "lvs"}}]}]}"#,
    );
    let out = bdevperf(&args_with(
        cfg.to_str().unwrap(),
        &[
            "-q", "32", "-o", "12288", "-w", "randrw", "-M", "50", "-t", "0.3",
        ],
    ));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let (jobs, total) = table(&stdout);
    assert_eq!(
        jobs.len(),
        1,
        "one job, on the lvol (its store claims the malloc): {stdout}"
    );
    assert!(total.figures[0] > 0.0, "no I/O was done: {stdout}");
    assert_eq!(jobs[0].figures[3], 0.0, "failed I/O: {stdout}\n{stderr}");
}
