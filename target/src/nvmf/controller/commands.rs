//! Admin commands on a controller: Identify, Get Log Page, Set and Get Features, and what
//! the host reads of its namespaces.

use super::*;

impl Controller {
    /// Runs one admin command. `data` is the command's buffer: filled for controller-to-host
    /// commands, read for host-to-controller ones.
    pub fn admin(&self, target: &NvmfTarget, cmd: &Command, data: &mut [u8]) -> AdminOutcome {
        self.keep_alive();
        let discovery = self.is_discovery();
        match cmd.opcode {
            admin::IDENTIFY => self.identify(cmd, data),
            admin::GET_LOG_PAGE => self.get_log_page(target, cmd, data),
            admin::SET_FEATURES => self.set_features(cmd),
            admin::GET_FEATURES => self.get_features(cmd),
            admin::KEEP_ALIVE => AdminOutcome::ok(0),
            admin::ASYNC_EVENT_REQUEST => AdminOutcome::HoldAer,
            // We never abort: dword 0 bit 0 set says "not aborted", which the spec allows.
            admin::ABORT if !discovery => AdminOutcome::ok(1),
            _ => AdminOutcome::err(Status::INVALID_OPCODE),
        }
    }

    fn identify(&self, cmd: &Command, data: &mut [u8]) -> AdminOutcome {
        let id = Identify::from_command(cmd);
        data.fill(0);
        let mut page = [0u8; identify::IDENTIFY_DATA_SIZE];
        match id.cns {
            cns::CONTROLLER => {
                let c = self.identify_controller();
                page.copy_from_slice(c.as_bytes());
            }
            _ if self.is_discovery() => return AdminOutcome::err(Status::INVALID_FIELD),
            cns::NAMESPACE => {
                if id.nsid == 0 || id.nsid > self.subsys.max_namespaces {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                }
                // An inactive NSID gets a zeroed structure, as the spec says.
                if let Some(ns) = self.subsys.namespace(id.nsid) {
                    page.copy_from_slice(identify_namespace(&ns).as_bytes());
                }
            }
            cns::ACTIVE_NS_LIST => {
                if id.nsid >= 0xFFFF_FFFE {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                }
                let ids = self
                    .subsys
                    .namespaces()
                    .iter()
                    .map(|n| n.nsid)
                    .collect::<Vec<_>>();
                let (l, _) = NamespaceList::from_ids(id.nsid, ids);
                page.copy_from_slice(l.as_bytes());
            }
            cns::NS_DESC_LIST => {
                let Some(ns) = self.subsys.namespace(id.nsid) else {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                };
                let descs = [
                    NsIdDescriptor::Eui64(ns.eui64),
                    NsIdDescriptor::Nguid(ns.nguid),
                    NsIdDescriptor::Uuid(*ns.uuid.as_bytes()),
                    NsIdDescriptor::Csi(identify::csi::NVM),
                ];
                if encode_ns_id_descriptors(&mut page, &descs).is_none() {
                    return AdminOutcome::err(Status::INTERNAL);
                }
            }
            // NVM command set specific structures: all zero means "no limits beyond MDTS".
            cns::CSI_CONTROLLER | cns::CSI_NAMESPACE if id.csi == identify::csi::NVM => {}
            _ => return AdminOutcome::err(Status::INVALID_FIELD),
        }
        let n = data.len().min(page.len());
        data[..n].copy_from_slice(&page[..n]);
        AdminOutcome::ok(0)
    }

    pub fn identify_controller(&self) -> IdentifyController {
        let mut c = IdentifyController::default();
        let s = &self.subsys;
        c.set_serial(&s.serial);
        c.set_model(&s.model);
        c.set_firmware_rev(FIRMWARE_REVISION);
        c.set_subnqn(&s.nqn);
        c.rab = 6;
        c.mdts = self.opts.mdts();
        c.cntlid.set(self.cntlid);
        c.ver.set(Vs::V1_3.0);
        c.kas.set(10); // keep-alive granularity: 1 s
        c.sqes = 0x66;
        c.cqes = 0x44;
        c.maxcmd.set(self.opts.max_queue_depth);
        c.ioccsz.set(self.opts.ioccsz());
        c.iorcsz.set(1);
        c.msdbd = 1;
        // RDMA data moves by keyed SGLs (the Linux host insists on the bit).
        let keyed = if self.opts.is_rdma() {
            identify::sgls::KEYED
        } else {
            0
        };
        c.sgls
            .set(identify::sgls::SUPPORTED | identify::sgls::OFFSET | keyed);
        c.aerl = (MAX_AERS - 1) as u8;
        c.elpe = 0;
        c.lpa = identify::lpa::EXTENDED_DATA;
        if self.is_discovery() {
            c.cntrltype = cntrltype::DISCOVERY;
            c.oaes.set(identify::oaes::DISCOVERY_CHANGE);
            return c;
        }
        c.cntrltype = cntrltype::IO;
        // Several controllers (hosts, paths) may share a namespace.
        c.cmic = 0x3;
        c.oaes.set(identify::oaes::NS_ATTRIBUTE);
        c.acl = 3;
        c.frmw = 0x3; // one slot, slot 1 read-only
        c.nn.set(s.max_namespaces);
        c.mnan.set(s.max_namespaces);
        c.oncs
            .set(identify::oncs::DSM | identify::oncs::WRITE_ZEROES | identify::oncs::RESERVATIONS);
        // Registrants are named by the 128-bit Host Identifier of Connect.
        c.ctratt.set(identify::ctratt::HOST_ID_128);
        // Volatile write cache present; flush with the broadcast NSID is not supported.
        c.vwc = 0x1 | 0x4;
        c.fna = 0;
        c.awun.set(0);
        c.awupf.set(0);
        c.wctemp.set(0x0157);
        c.cctemp.set(0x0175);
        c.psd[0].mp.set(2500);
        c
    }

    fn get_log_page(&self, target: &NvmfTarget, cmd: &Command, data: &mut [u8]) -> AdminOutcome {
        let g = GetLogPage::from_command(cmd);
        data.fill(0);
        if !g.offset.is_multiple_of(4) {
            return AdminOutcome::err(Status::INVALID_FIELD);
        }
        let page: Vec<u8> = match (g.lid, self.is_discovery()) {
            (lid::DISCOVERY, true) => super::super::discovery::log_page(target, &self.hostnqn),
            // No errors are recorded: one empty entry.
            (lid::ERROR_INFO, _) => ErrorInfoEntry::default().as_bytes().to_vec(),
            (lid::SMART, false) => {
                // A healthy, cool device: 25 °C, spare 100% above a 10% threshold.
                let mut smart = SmartLog::default();
                smart.temperature.set(298);
                smart.avail_spare = 100;
                smart.spare_thresh = 10;
                smart.as_bytes().to_vec()
            }
            (lid::FW_SLOT, false) => FwSlotLog::single_slot(FIRMWARE_REVISION)
                .as_bytes()
                .to_vec(),
            (lid::CHANGED_NS_LIST, false) => {
                let mut st = self.lock();
                let list = log::changed_namespace_list(&st.changed_ns);
                if !g.rae {
                    st.changed_ns.clear();
                    st.ns_notice_outstanding = false;
                }
                list.as_bytes().to_vec()
            }
            _ => return AdminOutcome::err(Status::INVALID_LOG_PAGE),
        };
        if log::copy_log_window(&page, g.offset, data).is_none() {
            return AdminOutcome::err(Status::INVALID_FIELD);
        }
        AdminOutcome::ok(0)
    }

    fn set_features(&self, cmd: &Command) -> AdminOutcome {
        let f = SetFeatures::from_command(cmd);
        if f.sv {
            return AdminOutcome::err(Status::FEATURE_NOT_SAVEABLE);
        }
        let mut st = self.lock();
        let discovery = self.is_discovery();
        match f.fid {
            fid::ASYNC_EVENT_CONFIG => {
                st.aec = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::KEEP_ALIVE_TIMER => {
                self.kato_ms
                    .store(features::keep_alive_ms(f.cdw11), Ordering::Relaxed);
                self.keep_alive();
                AdminOutcome::ok(0)
            }
            _ if discovery => AdminOutcome::err(Status::INVALID_FIELD),
            fid::NUMBER_OF_QUEUES => {
                if st.qpairs.iter().any(|q| q.qid != 0) {
                    return AdminOutcome::err(Status::COMMAND_SEQUENCE_ERROR);
                }
                let Some(req) = NumberOfQueues::from_request(f.cdw11) else {
                    return AdminOutcome::err(Status::INVALID_FIELD);
                };
                let max = self.opts.max_io_qpairs_per_ctrlr;
                let n = req.nsq.min(req.ncq).min(u32::from(max)).max(1);
                st.num_io_queues = n as u16;
                AdminOutcome::ok(NumberOfQueues { nsq: n, ncq: n }.to_dword())
            }
            fid::VOLATILE_WRITE_CACHE => {
                st.vwc = f.cdw11 & features::VWC_ENABLE != 0;
                AdminOutcome::ok(0)
            }
            fid::TEMPERATURE_THRESHOLD => {
                st.temp_threshold = f.cdw11 & 0xFFFF;
                AdminOutcome::ok(0)
            }
            fid::ERROR_RECOVERY => {
                st.err_recovery = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::ARBITRATION => {
                st.arbitration = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::POWER_MGMT => {
                if f.cdw11 & 0x1F != 0 {
                    return AdminOutcome::err(Status::INVALID_FIELD);
                }
                st.power_mgmt = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::INTERRUPT_COALESCING => {
                st.int_coalescing = f.cdw11;
                AdminOutcome::ok(0)
            }
            fid::WRITE_ATOMICITY => {
                st.write_atomicity = f.cdw11 & 1;
                AdminOutcome::ok(0)
            }
            fid::HOST_IDENTIFIER => AdminOutcome::err(Status::COMMAND_SEQUENCE_ERROR),
            fid::RESERVATION_PERSISTENCE => {
                let Some(ns) = self.subsys.namespace(cmd.nsid()) else {
                    return AdminOutcome::err(Status::INVALID_NAMESPACE);
                };
                drop(st);
                match ns.resv.set_ptpl(f.cdw11 & 1 != 0) {
                    s if s.is_success() => AdminOutcome::ok(0),
                    s => AdminOutcome::Done { status: s, dw0: 0 },
                }
            }
            _ => AdminOutcome::err(Status::INVALID_FIELD),
        }
    }

    fn get_features(&self, cmd: &Command) -> AdminOutcome {
        let f = GetFeatures::from_command(cmd);
        let st = self.lock();
        if f.sel == features::sel::SUPPORTED_CAPABILITIES {
            let mut caps = features::capability::CHANGEABLE;
            if f.fid == fid::RESERVATION_PERSISTENCE {
                caps |= features::capability::NS_SPECIFIC;
            }
            return AdminOutcome::ok(caps);
        }
        let discovery = self.is_discovery();
        let v = match f.fid {
            fid::ASYNC_EVENT_CONFIG => st.aec,
            fid::KEEP_ALIVE_TIMER => self.kato_ms.load(Ordering::Relaxed),
            _ if discovery => return AdminOutcome::err(Status::INVALID_FIELD),
            fid::NUMBER_OF_QUEUES => {
                let n = if st.num_io_queues > 0 {
                    st.num_io_queues
                } else {
                    self.opts.max_io_qpairs_per_ctrlr
                };
                NumberOfQueues {
                    nsq: u32::from(n),
                    ncq: u32::from(n),
                }
                .to_dword()
            }
            fid::VOLATILE_WRITE_CACHE => u32::from(st.vwc),
            fid::TEMPERATURE_THRESHOLD => st.temp_threshold,
            fid::ERROR_RECOVERY => st.err_recovery,
            fid::ARBITRATION => st.arbitration,
            fid::POWER_MGMT => st.power_mgmt,
            fid::INTERRUPT_COALESCING => st.int_coalescing,
            fid::WRITE_ATOMICITY => st.write_atomicity,
            fid::RESERVATION_PERSISTENCE => match self.subsys.namespace(cmd.nsid()) {
                Some(ns) => u32::from(ns.resv.ptpl()),
                None => return AdminOutcome::err(Status::INVALID_NAMESPACE),
            },
            _ => return AdminOutcome::err(Status::INVALID_FIELD),
        };
        AdminOutcome::ok(v)
    }
}

/// Identify Namespace for `ns`: one LBA format, the bdev's size, shared, with its IDs.
pub fn identify_namespace(ns: &Namespace) -> IdentifyNamespace {
    let mut n = IdentifyNamespace::default();
    let blocks = ns.num_blocks();
    n.nsze.set(blocks);
    n.ncap.set(blocks);
    n.nuse.set(blocks);
    n.nlbaf = 0;
    n.set_lba_format_index(0);
    n.lbaf[0] = LbaFormat::new(ns.block_size());
    n.nmic = 1;
    n.nguid = ns.nguid;
    n.eui64 = ns.eui64;
    n.rescap = rescap::ALL_TYPES;
    if ns.resv.ptpl_capable() {
        n.rescap |= rescap::PTPL;
    }
    n
}
