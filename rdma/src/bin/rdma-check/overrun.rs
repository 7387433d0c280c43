//! `rdma-check --overrun EXTRA ADDR PORT SUBNQN`: a host that keeps more commands in flight
//! than its I/O queue holds, to drive the target's path for capsules that find no free
//! command slot.
//!
//! Connects an admin queue and one I/O queue of [`DEPTH`] entries (SPDK's default
//! `max_queue_depth`; plexd gives such a queue pair 32 slots more), then sends DEPTH + EXTRA
//! one-block writes to LBAs 0, 1, … all at once, each carrying its data in the capsule, and
//! after their answers DEPTH + EXTRA reads of the same blocks by RDMA WRITE into our memory.
//! Namespace 1 must have 512-byte blocks and hold writes (a quiesced mirror, resumed by the
//! caller within [`ANSWERS_WITHIN`]), so the commands that found a slot still hold it when
//! the rest arrive, however slowly they come. Prints what came back: "ok: …" when every
//! command was answered once, successfully or refused with Command Sequence Error (how many
//! of each are refused is in the line), and every block written and read back is as written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nvme_spec::fabrics::{connect_result_cntlid, Connect, PropertyGet, PropertySet, PropertySize};
use nvme_spec::opcode::io;
use nvme_spec::rdma::CmRequest;
use nvme_spec::regs::offset;
use nvme_spec::{Command, Completion, ConnectData, IntoBytes, SglDescriptor, Status};
use rdma::verbs::CompletedOp;
use rdma::{
    Access, CmEventKind, CmId, CompletionQueue, ConnParam, EventChannel, MemoryRegion,
    ProtectionDomain, QueueCaps, SendOp, WorkCompletion,
};

use super::{expect, resolved, wait_until, wait_within, Step};

/// I/O queue entries asked for: SPDK's default `max_queue_depth` for RDMA.
const DEPTH: u16 = 128;
const ADMIN_DEPTH: u16 = 32;
const BLOCK: usize = 512;
const SQE: usize = Command::SIZE;
const CQE: usize = 16;
/// A capsule: the command and room for one block of in-capsule data.
const CAPSULE: usize = SQE + BLOCK;
/// Connect data sits at the start of the data region; the blocks read back follow it.
const CONNECT_DATA: usize = ConnectData::SIZE;
/// Send work is told apart from receives by this bit of its id.
const SEND: u64 = 1 << 32;
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6c0d2a5e-0b7e-4a44-9f3e-0a1b2c3d4e5f";
const HOSTID: [u8; 16] = *b"rdma-check-host!";
/// How long the answers to a burst may take: the namespace holds the writes until whoever
/// quiesced it resumes it.
const ANSWERS_WITHIN: Duration = Duration::from_secs(60);

/// Runs the probe; Ok with the line to print (success or what went wrong on the wire), Err
/// when the host itself could not do its part.
pub fn overrun(extra: usize, addr: SocketAddr, subnqn: &str) -> Step<String> {
    // Command ids are the commands' indexes, so they must stay distinct u16s.
    let n = usize::from(DEPTH) + extra;
    if n > usize::from(u16::MAX) {
        return Err(format!(
            "at most {} commands past the queue",
            u16::MAX - DEPTH
        ));
    }
    let mut admin = Queue::connect(addr, 0, ADMIN_DEPTH, 0, 0)?;
    let cntlid =
        admin.fabrics_connect(0, ADMIN_DEPTH, nvme_spec::fabrics::CNTLID_DYNAMIC, subnqn)?;
    // CC: EN, I/O SQ and CQ entry sizes 2^6 and 2^4 bytes.
    admin.property_set(offset::CC, 0x0046_0001)?;
    wait_until(|| Ok((admin.property_get(offset::CSTS)? & 1 == 1).then_some(())))
        .map_err(|e| format!("CSTS.RDY after CC.EN: {e}"))?;

    let mut ioq = Queue::connect(addr, 1, DEPTH, cntlid, extra)?;
    ioq.fabrics_connect(1, DEPTH, cntlid, subnqn)?;

    for i in 0..n {
        let mut cmd = rw_command(io::WRITE, i);
        cmd.set_sgl1(SglDescriptor::in_capsule(0, BLOCK as u32));
        ioq.send(i, &cmd, Some(&pattern(i)))?;
    }
    let writes_refused = match answered_once(&ioq.collect(n)?, n) {
        Ok(refused) => refused,
        Err(e) => return Ok(format!("writes: {e}")),
    };
    for i in 0..n {
        let mut cmd = rw_command(io::READ, i);
        cmd.set_sgl1(SglDescriptor::keyed_data_block(
            ioq.data.addr() + (CONNECT_DATA + i * BLOCK) as u64,
            BLOCK as u32,
            ioq.data.rkey(),
            false,
        ));
        ioq.send(i, &cmd, None)?;
    }
    let reads_refused = match answered_once(&ioq.collect(n)?, n) {
        Ok(refused) => refused,
        Err(e) => return Ok(format!("reads: {e}")),
    };
    for i in (0..n).filter(|&i| !writes_refused[i] && !reads_refused[i]) {
        let at = CONNECT_DATA + i * BLOCK;
        if ioq.memory[2][at..at + BLOCK] != pattern(i) {
            return Ok(format!("block {i} read back differs from what was written"));
        }
    }
    let _ = ioq.id.disconnect();
    let _ = admin.id.disconnect();
    let count = |refused: &[bool]| refused.iter().filter(|&&r| r).count();
    Ok(format!(
        "ok: {n} writes with in-capsule data, then {n} reads, on a queue of {DEPTH}: each \
         answered once; refused with Command Sequence Error: {} writes, {} reads; every block \
         written and read back is as written",
        count(&writes_refused),
        count(&reads_refused)
    ))
}

/// A one-block Read or Write of LBA `i` on namespace 1, command id `i`.
fn rw_command(opcode: u8, i: usize) -> Command {
    let mut cmd = Command::new(opcode).with_cid(i as u16);
    nvme_spec::cmd::ReadWrite {
        nsid: 1,
        slba: i as u64,
        nblocks: 1,
        ..Default::default()
    }
    .apply(&mut cmd);
    cmd
}

/// Block `i`'s contents: its number, then bytes that differ from every other block's.
fn pattern(i: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BLOCK).map(|j| (i * 31 + j * 7) as u8 ^ 0x5a).collect();
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b
}

/// Checks that `answers` hold each command id 0..n exactly once, each successful or refused
/// with Command Sequence Error (DNR), the answer to a command past every slot and every wait
/// in its receive. Returns which were refused.
fn answered_once(answers: &[Completion], n: usize) -> Result<Vec<bool>, String> {
    let mut seen = vec![false; n];
    let mut refused = vec![false; n];
    for c in answers {
        let cid = usize::from(c.cid());
        if cid >= n || std::mem::replace(&mut seen[cid], true) {
            return Err(format!("an answer for command {cid}, not expected"));
        }
        let status = c.status();
        if status.same_code(Status::COMMAND_SEQUENCE_ERROR) && status.dnr {
            refused[cid] = true;
        } else if !status.is_success() {
            return Err(format!("command {cid} failed: {status}"));
        }
    }
    Ok(refused)
}

/// One queue pair with `slots` capsule, response and data buffers, a receive posted for each
/// response.
struct Queue {
    // Dropped before the regions: the queue pair stops naming them first.
    id: CmId,
    events: Arc<EventChannel>,
    cq: Arc<CompletionQueue>,
    capsules: MemoryRegion,
    responses: MemoryRegion,
    data: MemoryRegion,
    /// capsules, responses, data: freed after the regions (fields drop in order).
    memory: Vec<Box<[u8]>>,
}

impl Queue {
    /// Connects queue `qid` of `depth` entries, with room for `extra` more commands in flight.
    fn connect(addr: SocketAddr, qid: u16, depth: u16, cntlid: u16, extra: usize) -> Step<Queue> {
        let slots = usize::from(depth) + extra;
        let (events, mut id) = resolved(addr)?;
        let device = id.device().ok_or("the identifier has no device")?;
        let pd = ProtectionDomain::new(&device).map_err(|e| e.to_string())?;
        let cq = CompletionQueue::new(&device, (2 * slots + 8) as u32, None)
            .map_err(|e| e.to_string())?;
        let caps = QueueCaps {
            max_send_wr: slots as u32 + 4,
            max_recv_wr: slots as u32 + 4,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        id.create_qp(&pd, &cq, &cq, None, caps)
            .map_err(|e| e.to_string())?;
        let mut memory: Vec<Box<[u8]>> = vec![
            vec![0; slots * CAPSULE].into(),
            vec![0; slots * CQE].into(),
            vec![0; CONNECT_DATA + slots * BLOCK].into(),
        ];
        let mut register = |i: usize, access| {
            let mem = &mut memory[i];
            // SAFETY: the boxes live in `memory`, which the Queue drops after the regions;
            // each buffer is touched only while no work names it (see `send` and `collect`).
            unsafe { MemoryRegion::register(&pd, mem.as_mut_ptr(), mem.len(), access) }
                .map_err(|e| e.to_string())
        };
        let capsules = register(0, Access::LOCAL_WRITE)?;
        let responses = register(1, Access::LOCAL_WRITE)?;
        let data = register(
            2,
            Access::LOCAL_WRITE
                .union(Access::REMOTE_READ)
                .union(Access::REMOTE_WRITE),
        )?;
        let q = Queue {
            id,
            events,
            cq,
            capsules,
            responses,
            data,
            memory,
        };
        for i in 0..slots {
            q.post_recv(i)?;
        }
        q.id.connect(ConnParam {
            private_data: CmRequest::for_queue(qid, depth, cntlid).as_bytes(),
            responder_resources: 16,
            retry_count: 7,
            rnr_retry_count: 7,
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        expect(&q.events, CmEventKind::Established)?;
        Ok(q)
    }

    fn post_recv(&self, i: usize) -> Step<()> {
        let sge = self
            .responses
            .sge(i * CQE, CQE as u32)
            .ok_or("response buffer")?;
        // SAFETY: response buffer i is read only after this receive completes.
        unsafe { self.id.post_recv(i as u64, sge) }.map_err(|e| e.to_string())
    }

    /// Sends `cmd` (and `data` in the capsule) from capsule buffer `i`.
    fn send(&mut self, i: usize, cmd: &Command, data: Option<&[u8]>) -> Step<()> {
        let at = i * CAPSULE;
        let buf = &mut self.memory[0][at..at + CAPSULE];
        buf[..SQE].copy_from_slice(cmd.as_bytes());
        let data = data.unwrap_or_default();
        buf[SQE..SQE + data.len()].copy_from_slice(data);
        let sge = self
            .capsules
            .sge(at, (SQE + data.len()) as u32)
            .ok_or("capsule buffer")?;
        // SAFETY: capsule buffer i is written again only after `collect` has seen this
        // command's answer, which the target sends after it has received the capsule.
        unsafe {
            self.id
                .post_send(SEND | i as u64, SendOp::Send, &[sge], true)
        }
        .map_err(|e| e.to_string())
    }

    /// The next `count` responses, each receive posted again once read. A failed work
    /// completion or a connection event ends the wait with an error.
    fn collect(&mut self, count: usize) -> Step<Vec<Completion>> {
        let mut out = Vec::with_capacity(count);
        let mut wcs = [WorkCompletion::default(); 16];
        wait_within(ANSWERS_WITHIN, || {
            let got = self.cq.poll(&mut wcs).map_err(|e| e.to_string())?;
            for wc in &wcs[..got] {
                wc.result()
                    .map_err(|e| format!("work {:#x}: {e}", wc.wr_id()))?;
                if wc.op() != CompletedOp::Recv {
                    continue;
                }
                let i = wc.wr_id() as usize;
                let bytes = &self.memory[1][i * CQE..(i + 1) * CQE];
                out.push(Completion::read(bytes).ok_or("short response")?);
                self.post_recv(i)?;
            }
            if let Some(ev) = self.events.next_event().map_err(|e| e.to_string())? {
                return Err(format!("the connection ended: {}", ev.kind.name()));
            }
            Ok((out.len() >= count).then_some(()))
        })
        .map_err(|e| format!("{} of {count} answers: {e}", out.len()))?;
        Ok(out)
    }

    /// Sends `cmd` alone and returns its answer. A command without data still names a
    /// keyed SGL, of length 0, as Linux's host does (its target refuses any other type).
    fn command(&mut self, cmd: &Command) -> Step<Completion> {
        let mut cmd = *cmd;
        if cmd.sgl1().is_empty() {
            cmd.set_sgl1(SglDescriptor::keyed_data_block(0, 0, 0, false));
        }
        let cmd = &cmd;
        self.send(0, cmd, None)?;
        let answer = self.collect(1)?.remove(0);
        if !answer.status().is_success() {
            return Err(format!(
                "command {:#04x} failed: {}",
                cmd.opcode,
                answer.status()
            ));
        }
        Ok(answer)
    }

    /// Fabrics Connect for queue `qid`, its data read by the target from our memory.
    fn fabrics_connect(&mut self, qid: u16, depth: u16, cntlid: u16, subnqn: &str) -> Step<u16> {
        let data = ConnectData::new(HOSTID, cntlid, subnqn, HOSTNQN).ok_or("NQN too long")?;
        self.memory[2][..CONNECT_DATA].copy_from_slice(data.as_bytes());
        let mut cmd = Connect {
            qid,
            sqsize: u32::from(depth),
            ..Default::default()
        }
        .to_command(0);
        cmd.set_sgl1(SglDescriptor::keyed_data_block(
            self.data.addr(),
            CONNECT_DATA as u32,
            self.data.rkey(),
            false,
        ));
        let answer = self.command(&cmd).map_err(|e| format!("connect: {e}"))?;
        Ok(connect_result_cntlid(&answer))
    }

    fn property_set(&mut self, offset: u32, value: u64) -> Step<()> {
        let cmd = PropertySet {
            size: PropertySize::Four,
            offset,
            value,
        }
        .to_command(0);
        self.command(&cmd).map(|_| ())
    }

    fn property_get(&mut self, offset: u32) -> Step<u32> {
        let cmd = PropertyGet {
            size: PropertySize::Four,
            offset,
        }
        .to_command(0);
        Ok(self.command(&cmd)?.result.get())
    }
}
