//! Drives the real connection code with arbitrary bytes, for the fuzz target
//! `fuzz/fuzz_targets/nvmf_tcp_capsule.rs`: the PDU decoder, capsule and SGL checks, Fabrics
//! Connect, admin commands and the I/O path to a malloc bdev.

use super::conn::Conn;
use crate::bdev::{malloc::MallocBdev, BdevRegistry};
use crate::nvmf::subsystem::{ListenAddr, Subsystem};
use crate::nvmf::{NvmfTarget, TransportOpts};
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
}

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
        s.add_namespace(e, 1, None, None, None).expect("namespace");
        let listener = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
        let port = listener.local_addr().expect("bound").port();
        let listen = ListenAddr {
            trtype: "TCP".into(),
            adrfam: "IPv4".into(),
            traddr: "127.0.0.1".into(),
            trsvcid: port.to_string(),
        };
        s.add_listener(listen.clone());
        let opts = target.transport().expect("created above");
        World {
            target,
            opts,
            listen,
            listener,
            _bdevs: bdevs,
        }
    })
}

/// Feeds `input` to a fresh connection as the host's byte stream, then closes the host side
/// and runs the connection until it finishes. Panics only if plexd does.
pub fn run_conn(input: &[u8]) {
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
        let (_, done) = conn.step();
        if done {
            break;
        }
    }
}
