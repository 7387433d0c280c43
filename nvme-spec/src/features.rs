//! Feature identifiers and the encodings of the features a Fabrics target and
//! host exchange (Base 2.0 "Feature Specific Information").

/// Feature Identifiers (Set/Get Features CDW10 7:0).
pub mod fid {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MGMT: u8 = 0x02;
    /// LBA Range Type.
    pub const LBA_RANGE_TYPE: u8 = 0x03;
    /// Temperature Threshold.
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing (PCIe).
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Interrupt Vector Configuration (PCIe).
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY: u8 = 0x0A;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    /// Autonomous Power State Transition.
    pub const AUTONOMOUS_POWER_STATE: u8 = 0x0C;
    /// Host Memory Buffer.
    pub const HOST_MEMORY_BUFFER: u8 = 0x0D;
    /// Timestamp.
    pub const TIMESTAMP: u8 = 0x0E;
    /// Keep Alive Timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
    /// Host Controlled Thermal Management.
    pub const HOST_THERMAL_MGMT: u8 = 0x10;
    /// Non-Operational Power State Config.
    pub const NON_OP_POWER_STATE: u8 = 0x11;
    /// Read Recovery Level Config.
    pub const READ_RECOVERY_LEVEL: u8 = 0x12;
    /// Predictable Latency Mode Config.
    pub const PLM_CONFIG: u8 = 0x13;
    /// Predictable Latency Mode Window.
    pub const PLM_WINDOW: u8 = 0x14;
    /// Host Behavior Support.
    pub const HOST_BEHAVIOR: u8 = 0x16;
    /// Sanitize Config.
    pub const SANITIZE_CONFIG: u8 = 0x17;
    /// Endurance Group Event Configuration.
    pub const ENDURANCE_GROUP_EVENT: u8 = 0x18;
    /// I/O Command Set Profile.
    pub const IO_COMMAND_SET_PROFILE: u8 = 0x19;
    /// Software Progress Marker.
    pub const SOFTWARE_PROGRESS_MARKER: u8 = 0x80;
    /// Host Identifier.
    pub const HOST_IDENTIFIER: u8 = 0x81;
    /// Reservation Notification Mask.
    pub const RESERVATION_NOTIFICATION_MASK: u8 = 0x82;
    /// Reservation Persistence.
    pub const RESERVATION_PERSISTENCE: u8 = 0x83;
    /// Namespace Write Protection Config.
    pub const NS_WRITE_PROTECTION: u8 = 0x84;
}

/// Get Features SEL values (CDW10 10:8).
pub mod sel {
    /// Current value.
    pub const CURRENT: u8 = 0;
    /// Default value.
    pub const DEFAULT: u8 = 1;
    /// Saved value.
    pub const SAVED: u8 = 2;
    /// Supported capabilities (result bits in [`super::capability`]).
    pub const SUPPORTED_CAPABILITIES: u8 = 3;
}

/// Result bits of Get Features with SEL = supported capabilities.
pub mod capability {
    /// The feature is saveable.
    pub const SAVEABLE: u32 = 1 << 0;
    /// The feature is namespace specific.
    pub const NS_SPECIFIC: u32 = 1 << 1;
    /// The feature is changeable.
    pub const CHANGEABLE: u32 = 1 << 2;
}

/// Number of Queues (FID 07h). Counts here are 1-based; the wire values in
/// CDW11 (request: NSQR 15:0, NCQR 31:16) and DW0 of the completion
/// (NSQA 15:0, NCQA 31:16) are 0-based. The admin queue is not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumberOfQueues {
    /// I/O submission queues.
    pub nsq: u32,
    /// I/O completion queues.
    pub ncq: u32,
}

impl NumberOfQueues {
    /// Decodes a Set Features request CDW11. `None` if either field is FFFFh,
    /// which the spec forbids (65536 queues): answer Invalid Field in Command.
    pub fn from_request(cdw11: u32) -> Option<Self> {
        let (sq, cq) = (cdw11 & 0xFFFF, cdw11 >> 16);
        if sq == 0xFFFF || cq == 0xFFFF {
            return None;
        }
        Some(NumberOfQueues {
            nsq: sq + 1,
            ncq: cq + 1,
        })
    }

    /// Decodes a completion DW0 (what was allocated).
    pub fn from_result(dw0: u32) -> Self {
        NumberOfQueues {
            nsq: (dw0 & 0xFFFF) + 1,
            ncq: (dw0 >> 16) + 1,
        }
    }

    /// Encodes as CDW11 / DW0 (counts clamped to 1..=65535).
    pub fn to_dword(&self) -> u32 {
        let sq = self.nsq.clamp(1, 0xFFFF) - 1;
        let cq = self.ncq.clamp(1, 0xFFFF) - 1;
        sq | (cq << 16)
    }
}

/// Asynchronous Event Configuration bits (FID 0Bh, CDW11).
pub mod aec {
    /// SMART / health critical warnings (bits 7:0).
    pub const SMART_MASK: u32 = 0xFF;
    /// Namespace Attribute Notices.
    pub const NS_ATTRIBUTE: u32 = 1 << 8;
    /// Firmware Activation Notices.
    pub const FW_ACTIVATION: u32 = 1 << 9;
    /// Telemetry Log Notices.
    pub const TELEMETRY: u32 = 1 << 10;
    /// ANA Change Notices.
    pub const ANA_CHANGE: u32 = 1 << 11;
    /// Discovery Log Page Change Notices.
    pub const DISCOVERY_CHANGE: u32 = 1 << 31;
}

/// Volatile Write Cache (FID 06h): CDW11 bit 0 WCE.
pub const VWC_ENABLE: u32 = 1 << 0;

/// Keep Alive Timer (FID 0Fh): CDW11 is KATO in milliseconds.
pub const fn keep_alive_ms(cdw11: u32) -> u32 {
    cdw11
}

/// Temperature Threshold (FID 04h) fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TemperatureThreshold {
    /// Threshold in Kelvin (15:0).
    pub tmpth: u16,
    /// Sensor select (19:16): 0 composite, 1..8 sensors.
    pub tmpsel: u8,
    /// 0 over-temperature, 1 under-temperature (21:20).
    pub thsel: u8,
}

impl TemperatureThreshold {
    /// Decodes CDW11.
    pub fn from_dword(v: u32) -> Self {
        TemperatureThreshold {
            tmpth: v as u16,
            tmpsel: ((v >> 16) & 0xF) as u8,
            thsel: ((v >> 20) & 0x3) as u8,
        }
    }

    /// Encodes CDW11.
    pub fn to_dword(&self) -> u32 {
        u32::from(self.tmpth)
            | (u32::from(self.tmpsel & 0xF) << 16)
            | (u32::from(self.thsel & 0x3) << 20)
    }
}

/// Arbitration (FID 01h) fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Arbitration {
    /// Arbitration burst, log2 (2:0); 7 = unlimited.
    pub ab: u8,
    /// Low priority weight, 0-based (15:8).
    pub lpw: u8,
    /// Medium priority weight (23:16).
    pub mpw: u8,
    /// High priority weight (31:24).
    pub hpw: u8,
}

impl Arbitration {
    /// Decodes CDW11.
    pub fn from_dword(v: u32) -> Self {
        Arbitration {
            ab: (v & 0x7) as u8,
            lpw: (v >> 8) as u8,
            mpw: (v >> 16) as u8,
            hpw: (v >> 24) as u8,
        }
    }

    /// Encodes CDW11.
    pub fn to_dword(&self) -> u32 {
        u32::from(self.ab & 0x7)
            | (u32::from(self.lpw) << 8)
            | (u32::from(self.mpw) << 16)
            | (u32::from(self.hpw) << 24)
    }
}

/// Error Recovery (FID 05h): time limited error recovery in 100 ms units
/// (15:0) and DULBE (bit 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ErrorRecovery {
    /// Time limited error recovery.
    pub tler: u16,
    /// Deallocated or unwritten logical block error enable.
    pub dulbe: bool,
}

impl ErrorRecovery {
    /// Decodes CDW11.
    pub fn from_dword(v: u32) -> Self {
        ErrorRecovery {
            tler: v as u16,
            dulbe: v & (1 << 16) != 0,
        }
    }

    /// Encodes CDW11.
    pub fn to_dword(&self) -> u32 {
        u32::from(self.tler) | (u32::from(self.dulbe) << 16)
    }
}

/// Interrupt Coalescing (FID 08h): aggregation threshold (7:0, 0-based) and
/// time (15:8, 100 µs units).
pub const fn interrupt_coalescing(thr: u8, time: u8) -> u32 {
    thr as u32 | ((time as u32) << 8)
}

/// Power Management (FID 02h): power state (4:0) and workload hint (7:5).
pub const fn power_management(ps: u8, wh: u8) -> u32 {
    (ps as u32 & 0x1F) | ((wh as u32 & 0x7) << 5)
}

/// Write Atomicity Normal (FID 0Ah): bit 0 DN (disable normal).
pub const WRITE_ATOMICITY_DN: u32 = 1 << 0;

/// Host Identifier (FID 81h): CDW11 bit 0 EXHID selects the 128-bit form;
/// Fabrics requires it, since the Connect HOSTID is 128 bits.
pub const HOST_ID_EXTENDED: u32 = 1 << 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_of_queues() {
        // Linux asks for e.g. 8 I/O queues: NSQR = NCQR = 7.
        let q = NumberOfQueues::from_request(0x0007_0007).unwrap();
        assert_eq!(q, NumberOfQueues { nsq: 8, ncq: 8 });
        assert_eq!(NumberOfQueues { nsq: 4, ncq: 2 }.to_dword(), 0x0001_0003);
        assert!(NumberOfQueues::from_request(0xFFFF_0000).is_none());
        assert!(NumberOfQueues::from_request(0x0000_FFFF).is_none());
        assert_eq!(
            NumberOfQueues::from_result(0xFFFE_FFFE),
            NumberOfQueues {
                nsq: 65535,
                ncq: 65535
            }
        );
    }

    #[test]
    fn small_features() {
        let t = TemperatureThreshold {
            tmpth: 350,
            tmpsel: 2,
            thsel: 1,
        };
        assert_eq!(t.to_dword(), 350 | 2 << 16 | 1 << 20);
        assert_eq!(TemperatureThreshold::from_dword(t.to_dword()), t);
        let a = Arbitration {
            ab: 3,
            lpw: 1,
            mpw: 2,
            hpw: 3,
        };
        assert_eq!(a.to_dword(), 0x0302_0103);
        assert_eq!(Arbitration::from_dword(a.to_dword()), a);
        let e = ErrorRecovery {
            tler: 10,
            dulbe: true,
        };
        assert_eq!(ErrorRecovery::from_dword(e.to_dword()), e);
        assert_eq!(interrupt_coalescing(4, 10), 0x0A04);
        assert_eq!(power_management(2, 1), 0x22);
    }
}
