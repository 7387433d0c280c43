//! The bdev layer's own cost per I/O: submit + poll on null and malloc bdevs from one thread,
//! at several queue depths, 4 KiB reads and writes. No device time is in these numbers, so they
//! bound what the layer adds to every NVMe-oF I/O.
//!
//! Run: `cargo bench -p plexd --bench bdev_layer` (or benches/run.sh).
//!
//! `cargo bench -p plexd --bench bdev_layer -- qos` runs only the rate-limit rows: the same
//! null-bdev reads with no limit (the path every unlimited bdev takes), and with a limit set
//! so high it never holds an I/O back (the admission arithmetic on every I/O).
//! `benches/qos.py --baseline REV` compares the first against a build from before QoS existed.

use plexd::bdev::malloc::MallocBdev;
use plexd::bdev::null::NullBdev;
use plexd::bdev::qos::QosLimits;
use plexd::bdev::{Bdev, BdevIo, BdevRegistry, IoBufs, IoType};
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

fn run(name: &str, bdev: Arc<dyn Bdev>, io_type: IoType, qd: usize, total: u64) {
    run_with(name, bdev, io_type, qd, total, |_| {})
}

fn run_with(
    name: &str,
    bdev: Arc<dyn Bdev>,
    io_type: IoType,
    qd: usize,
    total: u64,
    setup: impl FnOnce(&plexd::bdev::BdevEntry),
) {
    let reg = BdevRegistry::default();
    let entry = reg.register(bdev).unwrap();
    setup(&entry);
    let mut ch = entry.open_channel().unwrap();
    let blocks = entry.info().num_blocks();
    let bs = entry.info().block_size as u64;
    let per_io = 4096 / bs;
    let mut spare: Vec<IoBufs> = (0..qd)
        .map(|_| smallvec::smallvec![dma::DmaBuf::zeroed(4096).unwrap().into()])
        .collect();
    let mut lba: u64 = 0;
    let mut next = |bufs: IoBufs, tag: u64| {
        lba = (lba
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
            % (blocks / per_io);
        BdevIo::new(io_type, lba * per_io, per_io, bufs, tag)
    };
    let start = Instant::now();
    let (mut submitted, mut done) = (0u64, 0u64);
    while done < total {
        plexd::reactor::refresh_loop_clock();
        while submitted < total && submitted - done < qd as u64 {
            let bufs = spare.pop().expect("a buffer per queue slot");
            ch.submit(next(bufs, submitted))
                .expect("null and malloc never fill up");
            submitted += 1;
        }
        ch.poll(&mut |c| {
            assert!(c.status.is_ok());
            spare.push(c.bufs);
            done += 1;
        });
    }
    let ns = start.elapsed().as_nanos() as f64 / total as f64;
    println!(
        "{name:<8} {:<6} qd {qd:<4} {ns:>7.1} ns/io  {:>6.2} M IOPS",
        format!("{io_type:?}").to_lowercase(),
        1e3 / ns
    );
}

fn qos_rows(total: u64) {
    println!("bdev layer, QoS cost, one thread, 4 KiB reads, {total} I/Os per row");
    for qd in [1, 32] {
        let null = NullBdev::new("n".into(), 1 << 20, 512, Uuid::new_v4()).unwrap();
        run("no-limit", Arc::new(null), IoType::Read, qd, total);
        let null = NullBdev::new("n".into(), 1 << 20, 512, Uuid::new_v4()).unwrap();
        run_with("qos-on", Arc::new(null), IoType::Read, qd, total, |e| {
            // 10^12 IOPS: the budget is checked and drawn on every I/O but never runs out.
            let l = QosLimits {
                rw_ios_per_sec: 1_000_000_000_000,
                ..Default::default()
            };
            e.qos.set_limits(l, plexd::reactor::now_ns());
        });
    }
}

fn main() {
    let total = 2_000_000;
    if std::env::args().skip(1).any(|a| a == "qos") {
        return qos_rows(total);
    }
    println!("bdev layer, one thread, 4 KiB I/O, {total} I/Os per row");
    for qd in [1, 32, 128] {
        for t in [IoType::Read, IoType::Write] {
            let null = NullBdev::new("n".into(), 1 << 20, 512, Uuid::new_v4()).unwrap();
            run("null", Arc::new(null), t, qd, total);
        }
    }
    for qd in [1, 32] {
        for t in [IoType::Read, IoType::Write] {
            let m = MallocBdev::new("m".into(), 1 << 18, 512, Uuid::new_v4()).unwrap();
            run("malloc", Arc::new(m), t, qd, total);
        }
    }
}
