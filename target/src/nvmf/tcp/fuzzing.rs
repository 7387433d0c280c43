//! Drives the real connection code with arbitrary bytes, for the fuzz target
//! `fuzz/fuzz_targets/nvmf_tcp_capsule.rs`: the PDU decoder, capsule and SGL checks, Fabrics
//! Connect, admin commands and the I/O path to a malloc bdev.

use super::conn::Conn;
use crate::bdev::{malloc::MallocBdev, BdevRegistry};
use crate::nvmf::controller::{self, ConnInfo, Controller};
use crate::nvmf::subsystem::{ListenAddr, Subsystem};
use crate::nvmf::{NvmfTarget, TransportOpts};
use nvme_spec::cmd::{Command, SglDescriptor};
use nvme_spec::fabrics::{Connect, ConnectData, PropertySet, PropertySize};
use nvme_spec::regs::{offset as reg, Cc};
use nvme_spec::tcp::{header_digest, CapsuleCmd, IcReq};
use nvme_spec::IntoBytes;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};

pub const FUZZ_NQN: &str = "nqn.2024-01.io.plexstor:fuzz";

struct World {
    target: Arc<NvmfTarget>,
    opts: Arc<TransportOpts>,
    listen: ListenAddr,
    listener: TcpListener,
    _bdevs: BdevRegistry,
    /// An enabled controller that fuzzed I/O queues may connect to.
    io_ctrl: Arc<Controller>,
}

const FUZZ_HOST: &str = "nqn.2024-01.io.plexstor:fuzz-host";

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let target = Arc::new(NvmfTarget::default());
        target
            .create_transport(TransportOpts::default())
            .expect("default transport options are valid");
        let s = Subsystem::new(FUZZ_NQN.into(), None, None, true, 4, 1, 0xFFEF)
            .expect("valid subsystem");
        let s = target.add_subsystem(s).expect("new subsystem");
        let bdevs = BdevRegistry::default();
        let b = MallocBdev::new("fuzz0".into(), 256, 512, uuid::Uuid::from_u128(1))
            .expect("malloc bdev");
        let e = bdevs.register(Arc::new(b)).expect("register");
        s.add_namespace(e, 1, None, None, None, None)
            .expect("namespace");
        let listener = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
        let port = listener.local_addr().expect("bound").port();
        let listen = ListenAddr {
            trtype: "TCP".into(),
            adrfam: "IPv4".into(),
            traddr: "127.0.0.1".into(),
            trsvcid: port.to_string(),
        };
        s.add_listener(listen.clone());
        let opts = target.transport("TCP").expect("created above");
        let info = ConnInfo {
            listen: &listen,
            peer: "fuzz",
            reactor: 0,
            opts: &opts,
            hdgst: false,
            ddgst: false,
        };
        let data = ConnectData::new([1; 16], 0xFFFF, FUZZ_NQN, FUZZ_HOST).expect("fits");
        let cmd = Connect {
            recfmt: 0,
            qid: 0,
            sqsize: 32,
            cattr: 0,
            kato: 0,
        }
        .to_command(0);
        let io_ctrl = match controller::connect(&target, &info, &cmd, data.as_bytes()) {
            Ok(c) => c.ctrl,
            Err(_) => panic!("the fuzz world's controller connects"),
        };
        io_ctrl.property_set(&PropertySet {
            size: PropertySize::Four,
            offset: reg::CC,
            value: u64::from(Cc::enable_default().0),
        });
        World {
            target,
            opts,
            listen,
            listener,
            _bdevs: bdevs,
            io_ctrl,
        }
    })
}

/// A capsule as a host would send it, with digests as negotiated.
fn capsule(cmd: Command, data: &[u8], hdgst: bool, ddgst: bool) -> Vec<u8> {
    let mut cmd = cmd;
    if !data.is_empty() {
        cmd.set_sgl1(SglDescriptor::in_capsule(0, data.len() as u32));
    }
    let Some(c) = CapsuleCmd::new(cmd, data.len() as u32, hdgst, ddgst, 0) else {
        return Vec::new();
    };
    let mut b = c.as_bytes().to_vec();
    if hdgst {
        let d = header_digest(&b);
        b.extend_from_slice(&d.to_le_bytes());
    }
    if !data.is_empty() {
        b.extend_from_slice(data);
        if ddgst {
            b.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        }
    }
    b
}

/// Fuzz entry. The first byte picks a valid prefix so that random bytes reach deep states:
/// bit 0 an ICReq (bits 1 and 2: header and data digests), then bits 4..5: 1 = admin Connect
/// and CC.EN, 2 = I/O queue Connect to a standing controller. The rest goes as is.
pub fn run_conn(input: &[u8]) {
    let Some((&mode, rest)) = input.split_first() else {
        return run_stream(&[]);
    };
    if mode & 1 == 0 {
        return run_stream(rest);
    }
    let (hd, dd) = (mode & 2 != 0, mode & 4 != 0);
    let mut s = IcReq::new(0, hd, dd, 0).as_bytes().to_vec();
    let w = world();
    match (mode >> 4) & 3 {
        1 => {
            let data = ConnectData::new([2; 16], 0xFFFF, FUZZ_NQN, FUZZ_HOST).expect("fits");
            let c = Connect {
                recfmt: 0,
                qid: 0,
                sqsize: 32,
                cattr: 0,
                kato: 0,
            };
            s.extend(capsule(c.to_command(1), data.as_bytes(), hd, dd));
            let cc = PropertySet {
                size: PropertySize::Four,
                offset: reg::CC,
                value: u64::from(Cc::enable_default().0),
            };
            s.extend(capsule(cc.to_command(2), &[], hd, dd));
        }
        2 => {
            let cntlid = w.io_ctrl.cntlid;
            let data = ConnectData::new([1; 16], cntlid, FUZZ_NQN, FUZZ_HOST).expect("fits");
            let c = Connect {
                recfmt: 0,
                qid: 1,
                sqsize: 128,
                cattr: 0,
                kato: 0,
            };
            s.extend(capsule(c.to_command(1), data.as_bytes(), hd, dd));
        }
        _ => {}
    }
    s.extend_from_slice(rest);
    run_stream(&s);
}

fn run_stream(input: &[u8]) {
    let w = world();
    let Ok(mut host) = TcpStream::connect(w.listener.local_addr().expect("bound")) else {
        return;
    };
    let Ok((sock, _)) = w.listener.accept() else {
        return;
    };
    let Ok(mut conn) = Conn::new(sock, w.target.clone(), w.opts.clone(), w.listen.clone(), 0)
    else {
        return;
    };
    let _ = host.set_nonblocking(true);
    let mut sink = vec![0u8; 1 << 16];
    let mut fed = 0;
    if input.is_empty() {
        let _ = host.shutdown(std::net::Shutdown::Write);
    }
    for _ in 0..10_000 {
        if fed < input.len() {
            match host.write(&input[fed..]) {
                Ok(n) => fed += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => fed = input.len(),
            }
            if fed == input.len() {
                let _ = host.shutdown(std::net::Shutdown::Write);
            }
        }
        while let Ok(n) = host.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        // No epoll here: every step may read and write.
        conn.set_ready(true, true);
        let (_, done) = conn.step();
        if done {
            break;
        }
    }
}
