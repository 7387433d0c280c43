//! Completion status (Base 2.0 "Completion Queue Entry: Status Field" and the
//! status code tables that follow it).
//!
//! The 16-bit status word of a CQE is laid out as:
//! bit 0 phase tag (P), bits 8:1 Status Code (SC), bits 11:9 Status Code Type
//! (SCT), bits 13:12 Command Retry Delay (CRD), bit 14 More (M), bit 15 Do Not
//! Retry (DNR). [`Status`] holds everything except the phase tag, which belongs
//! to the queue, not to the command's outcome.

use core::fmt;

/// Status Code Type values.
pub mod sct {
    /// Generic Command Status.
    pub const GENERIC: u8 = 0x0;
    /// Command Specific Status.
    pub const COMMAND_SPECIFIC: u8 = 0x1;
    /// Media and Data Integrity Errors.
    pub const MEDIA: u8 = 0x2;
    /// Path Related Status.
    pub const PATH: u8 = 0x3;
    /// Vendor Specific.
    pub const VENDOR: u8 = 0x7;
}

/// The outcome of a command as carried in a CQE status word (minus the phase).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Status {
    /// Status Code Type (3 bits).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Command Retry Delay index (2 bits): selects Identify Controller CRDT1..3; 0 = retry at once.
    pub crd: u8,
    /// More: further information is in the Error Information log page.
    pub more: bool,
    /// Do Not Retry: the same command would fail again.
    pub dnr: bool,
}

macro_rules! status_consts {
    ($( $(#[$m:meta])* $name:ident = ($sct:expr, $sc:expr); )*) => {
        impl Status {
            $( $(#[$m])* pub const $name: Status = Status::new($sct, $sc); )*
        }
    };
}

status_consts! {
    /// Successful Completion.
    SUCCESS = (sct::GENERIC, 0x00);
    /// Invalid Command Opcode.
    INVALID_OPCODE = (sct::GENERIC, 0x01);
    /// Invalid Field in Command.
    INVALID_FIELD = (sct::GENERIC, 0x02);
    /// Command ID Conflict.
    CID_CONFLICT = (sct::GENERIC, 0x03);
    /// Data Transfer Error.
    DATA_TRANSFER_ERROR = (sct::GENERIC, 0x04);
    /// Commands Aborted due to Power Loss Notification.
    ABORTED_POWER_LOSS = (sct::GENERIC, 0x05);
    /// Internal Error.
    INTERNAL = (sct::GENERIC, 0x06);
    /// Command Abort Requested.
    ABORT_REQUESTED = (sct::GENERIC, 0x07);
    /// Command Aborted due to SQ Deletion.
    ABORTED_SQ_DELETION = (sct::GENERIC, 0x08);
    /// Command Aborted due to Failed Fused Command.
    ABORTED_FAILED_FUSED = (sct::GENERIC, 0x09);
    /// Command Aborted due to Missing Fused Command.
    ABORTED_MISSING_FUSED = (sct::GENERIC, 0x0A);
    /// Invalid Namespace or Format.
    INVALID_NAMESPACE = (sct::GENERIC, 0x0B);
    /// Command Sequence Error.
    COMMAND_SEQUENCE_ERROR = (sct::GENERIC, 0x0C);
    /// Invalid SGL Segment Descriptor.
    SGL_INVALID_LAST_SEGMENT = (sct::GENERIC, 0x0D);
    /// Invalid Number of SGL Descriptors.
    SGL_INVALID_COUNT = (sct::GENERIC, 0x0E);
    /// Data SGL Length Invalid.
    SGL_INVALID_DATA_LENGTH = (sct::GENERIC, 0x0F);
    /// Metadata SGL Length Invalid.
    SGL_INVALID_METADATA_LENGTH = (sct::GENERIC, 0x10);
    /// SGL Descriptor Type Invalid.
    SGL_INVALID_TYPE = (sct::GENERIC, 0x11);
    /// Invalid Use of Controller Memory Buffer.
    INVALID_CMB_USE = (sct::GENERIC, 0x12);
    /// PRP Offset Invalid.
    PRP_INVALID_OFFSET = (sct::GENERIC, 0x13);
    /// Atomic Write Unit Exceeded.
    ATOMIC_WRITE_UNIT_EXCEEDED = (sct::GENERIC, 0x14);
    /// Operation Denied.
    OPERATION_DENIED = (sct::GENERIC, 0x15);
    /// SGL Offset Invalid.
    SGL_INVALID_OFFSET = (sct::GENERIC, 0x16);
    /// SGL Sub Type Invalid.
    SGL_INVALID_SUBTYPE = (sct::GENERIC, 0x17);
    /// Host Identifier Inconsistent Format.
    HOST_ID_INCONSISTENT_FORMAT = (sct::GENERIC, 0x18);
    /// Keep Alive Timer Expired.
    KEEP_ALIVE_EXPIRED = (sct::GENERIC, 0x19);
    /// Keep Alive Timeout Invalid.
    KEEP_ALIVE_INVALID = (sct::GENERIC, 0x1A);
    /// Command Aborted due to Preempt and Abort.
    ABORTED_PREEMPT = (sct::GENERIC, 0x1B);
    /// Sanitize Failed.
    SANITIZE_FAILED = (sct::GENERIC, 0x1C);
    /// Sanitize In Progress.
    SANITIZE_IN_PROGRESS = (sct::GENERIC, 0x1D);
    /// SGL Data Block Granularity Invalid.
    SGL_INVALID_GRANULARITY = (sct::GENERIC, 0x1E);
    /// Command Not Supported for Queue in CMB.
    CMD_NOT_SUPPORTED_QUEUE_IN_CMB = (sct::GENERIC, 0x1F);
    /// Namespace is Write Protected.
    NS_WRITE_PROTECTED = (sct::GENERIC, 0x20);
    /// Command Interrupted (retry may succeed).
    COMMAND_INTERRUPTED = (sct::GENERIC, 0x21);
    /// Transient Transport Error.
    TRANSIENT_TRANSPORT_ERROR = (sct::GENERIC, 0x22);
    /// Command Prohibited by Command and Feature Lockdown.
    PROHIBITED_BY_LOCKDOWN = (sct::GENERIC, 0x23);
    /// Admin Command Media Not Ready.
    ADMIN_MEDIA_NOT_READY = (sct::GENERIC, 0x24);
    /// LBA Out of Range (NVM command set).
    LBA_OUT_OF_RANGE = (sct::GENERIC, 0x80);
    /// Capacity Exceeded (NVM command set).
    CAPACITY_EXCEEDED = (sct::GENERIC, 0x81);
    /// Namespace Not Ready (NVM command set).
    NAMESPACE_NOT_READY = (sct::GENERIC, 0x82);
    /// Reservation Conflict (NVM command set).
    RESERVATION_CONFLICT = (sct::GENERIC, 0x83);
    /// Format In Progress (NVM command set).
    FORMAT_IN_PROGRESS = (sct::GENERIC, 0x84);

    /// Completion Queue Invalid.
    INVALID_CQ = (sct::COMMAND_SPECIFIC, 0x00);
    /// Invalid Queue Identifier.
    INVALID_QUEUE_IDENTIFIER = (sct::COMMAND_SPECIFIC, 0x01);
    /// Invalid Queue Size.
    INVALID_QUEUE_SIZE = (sct::COMMAND_SPECIFIC, 0x02);
    /// Abort Command Limit Exceeded.
    ABORT_LIMIT_EXCEEDED = (sct::COMMAND_SPECIFIC, 0x03);
    /// Asynchronous Event Request Limit Exceeded.
    ASYNC_EVENT_LIMIT_EXCEEDED = (sct::COMMAND_SPECIFIC, 0x05);
    /// Invalid Firmware Slot.
    INVALID_FIRMWARE_SLOT = (sct::COMMAND_SPECIFIC, 0x06);
    /// Invalid Firmware Image.
    INVALID_FIRMWARE_IMAGE = (sct::COMMAND_SPECIFIC, 0x07);
    /// Invalid Interrupt Vector.
    INVALID_INTERRUPT_VECTOR = (sct::COMMAND_SPECIFIC, 0x08);
    /// Invalid Log Page.
    INVALID_LOG_PAGE = (sct::COMMAND_SPECIFIC, 0x09);
    /// Invalid Format.
    INVALID_FORMAT = (sct::COMMAND_SPECIFIC, 0x0A);
    /// Invalid Queue Deletion.
    INVALID_QUEUE_DELETION = (sct::COMMAND_SPECIFIC, 0x0C);
    /// Feature Identifier Not Saveable.
    FEATURE_NOT_SAVEABLE = (sct::COMMAND_SPECIFIC, 0x0D);
    /// Feature Not Changeable.
    FEATURE_NOT_CHANGEABLE = (sct::COMMAND_SPECIFIC, 0x0E);
    /// Feature Not Namespace Specific.
    FEATURE_NOT_NS_SPECIFIC = (sct::COMMAND_SPECIFIC, 0x0F);
    /// Overlapping Range.
    OVERLAPPING_RANGE = (sct::COMMAND_SPECIFIC, 0x14);
    /// Namespace Insufficient Capacity.
    NS_INSUFFICIENT_CAPACITY = (sct::COMMAND_SPECIFIC, 0x15);
    /// Namespace Identifier Unavailable.
    NS_ID_UNAVAILABLE = (sct::COMMAND_SPECIFIC, 0x16);
    /// Namespace Already Attached.
    NS_ALREADY_ATTACHED = (sct::COMMAND_SPECIFIC, 0x18);
    /// Namespace Is Private.
    NS_IS_PRIVATE = (sct::COMMAND_SPECIFIC, 0x19);
    /// Namespace Not Attached.
    NS_NOT_ATTACHED = (sct::COMMAND_SPECIFIC, 0x1A);
    /// Controller List Invalid.
    CONTROLLER_LIST_INVALID = (sct::COMMAND_SPECIFIC, 0x1C);
    /// Device Self-test In Progress.
    SELF_TEST_IN_PROGRESS = (sct::COMMAND_SPECIFIC, 0x1D);
    /// Invalid Controller Identifier.
    INVALID_CONTROLLER_ID = (sct::COMMAND_SPECIFIC, 0x1F);
    /// ANA Group Identifier Invalid.
    ANA_GROUP_ID_INVALID = (sct::COMMAND_SPECIFIC, 0x24);
    /// ANA Attach Failed.
    ANA_ATTACH_FAILED = (sct::COMMAND_SPECIFIC, 0x25);
    /// Conflicting Attributes (Dataset Management, Read, Write; NVM command set).
    CONFLICTING_ATTRIBUTES = (sct::COMMAND_SPECIFIC, 0x80);
    /// Invalid Protection Information (NVM command set).
    INVALID_PROTECTION_INFO = (sct::COMMAND_SPECIFIC, 0x81);
    /// Attempted Write to Read Only Range (NVM command set).
    WRITE_TO_READ_ONLY_RANGE = (sct::COMMAND_SPECIFIC, 0x82);
    /// Command Size Limit Exceeded (Copy; NVM command set).
    COMMAND_SIZE_LIMIT_EXCEEDED = (sct::COMMAND_SPECIFIC, 0x83);

    /// Connect: Incompatible Format (RECFMT not supported).
    CONNECT_INCOMPATIBLE_FORMAT = (sct::COMMAND_SPECIFIC, 0x80);
    /// Connect: Controller Busy (e.g. the requested queue already exists).
    CONNECT_CONTROLLER_BUSY = (sct::COMMAND_SPECIFIC, 0x81);
    /// Connect: Invalid Parameters; dw0 carries IATTR/IPO (see `fabrics`).
    CONNECT_INVALID_PARAMETERS = (sct::COMMAND_SPECIFIC, 0x82);
    /// Connect: Restart Discovery.
    CONNECT_RESTART_DISCOVERY = (sct::COMMAND_SPECIFIC, 0x83);
    /// Connect: Invalid Host (host NQN not allowed on the subsystem).
    CONNECT_INVALID_HOST = (sct::COMMAND_SPECIFIC, 0x84);
    /// Fabrics: Invalid Queue Type.
    INVALID_QUEUE_TYPE = (sct::COMMAND_SPECIFIC, 0x85);
    /// Discover Restart (Get Log Page on a discovery controller).
    DISCOVER_RESTART = (sct::COMMAND_SPECIFIC, 0x90);
    /// Authentication Required.
    AUTH_REQUIRED = (sct::COMMAND_SPECIFIC, 0x91);

    /// Write Fault.
    WRITE_FAULT = (sct::MEDIA, 0x80);
    /// Unrecovered Read Error.
    UNRECOVERED_READ_ERROR = (sct::MEDIA, 0x81);
    /// End-to-end Guard Check Error.
    GUARD_CHECK_ERROR = (sct::MEDIA, 0x82);
    /// End-to-end Application Tag Check Error.
    APPTAG_CHECK_ERROR = (sct::MEDIA, 0x83);
    /// End-to-end Reference Tag Check Error.
    REFTAG_CHECK_ERROR = (sct::MEDIA, 0x84);
    /// Compare Failure.
    COMPARE_FAILURE = (sct::MEDIA, 0x85);
    /// Access Denied.
    ACCESS_DENIED = (sct::MEDIA, 0x86);
    /// Deallocated or Unwritten Logical Block.
    DEALLOCATED_OR_UNWRITTEN = (sct::MEDIA, 0x87);

    /// Internal Path Error.
    INTERNAL_PATH_ERROR = (sct::PATH, 0x00);
    /// Asymmetric Access Persistent Loss.
    ANA_PERSISTENT_LOSS = (sct::PATH, 0x01);
    /// Asymmetric Access Inaccessible.
    ANA_INACCESSIBLE = (sct::PATH, 0x02);
    /// Asymmetric Access Transition.
    ANA_TRANSITION = (sct::PATH, 0x03);
    /// Controller Pathing Error.
    CONTROLLER_PATHING_ERROR = (sct::PATH, 0x60);
    /// Host Pathing Error (set by a host on transport loss, never sent on the wire).
    HOST_PATHING_ERROR = (sct::PATH, 0x70);
    /// Command Aborted By Host.
    ABORTED_BY_HOST = (sct::PATH, 0x71);
}

const SC_SHIFT: u16 = 1;
const SCT_SHIFT: u16 = 9;
const CRD_SHIFT: u16 = 12;
const MORE_BIT: u16 = 1 << 14;
const DNR_BIT: u16 = 1 << 15;
/// Phase tag bit of the CQE status word.
pub const PHASE_BIT: u16 = 1;

impl Status {
    /// A status with the given type and code, CRD 0, More and DNR clear.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Status {
            sct: sct & 0x7,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    /// The same status with Do Not Retry set.
    #[must_use]
    pub const fn with_dnr(mut self) -> Self {
        self.dnr = true;
        self
    }

    /// The same status with the More bit set.
    #[must_use]
    pub const fn with_more(mut self) -> Self {
        self.more = true;
        self
    }

    /// The same status with a Command Retry Delay index (0..=3).
    #[must_use]
    pub const fn with_crd(mut self, crd: u8) -> Self {
        self.crd = crd & 0x3;
        self
    }

    /// True for Successful Completion (any SCT 0 / SC 0, whatever DNR/More say).
    pub const fn is_success(&self) -> bool {
        self.sct == sct::GENERIC && self.sc == 0
    }

    /// True if SCT/SC match `other`, ignoring CRD, More and DNR.
    pub const fn same_code(&self, other: Status) -> bool {
        self.sct == other.sct && self.sc == other.sc
    }

    /// Encodes into a CQE status word with the given phase tag.
    pub const fn to_word(&self, phase: bool) -> u16 {
        (phase as u16)
            | ((self.sc as u16) << SC_SHIFT)
            | (((self.sct & 0x7) as u16) << SCT_SHIFT)
            | (((self.crd & 0x3) as u16) << CRD_SHIFT)
            | if self.more { MORE_BIT } else { 0 }
            | if self.dnr { DNR_BIT } else { 0 }
    }

    /// Decodes a CQE status word; the phase tag is ignored.
    pub const fn from_word(word: u16) -> Self {
        Status {
            sc: (word >> SC_SHIFT) as u8,
            sct: ((word >> SCT_SHIFT) & 0x7) as u8,
            crd: ((word >> CRD_SHIFT) & 0x3) as u8,
            more: word & MORE_BIT != 0,
            dnr: word & DNR_BIT != 0,
        }
    }

    /// Name of the status for logs. Command-specific codes 80h..85h mean
    /// different things for Connect and for NVM I/O commands; this returns the
    /// Fabrics meaning only when `fabrics` is true.
    pub const fn name_in(&self, fabrics: bool) -> &'static str {
        match (self.sct, self.sc) {
            (sct::COMMAND_SPECIFIC, 0x80..=0x85) if fabrics => match self.sc {
                0x80 => "Connect Incompatible Format",
                0x81 => "Connect Controller Busy",
                0x82 => "Connect Invalid Parameters",
                0x83 => "Connect Restart Discovery",
                0x84 => "Connect Invalid Host",
                _ => "Invalid Queue Type",
            },
            _ => self.name(),
        }
    }

    /// Name of the status for logs (NVM command set meaning for
    /// command-specific 80h..83h; see [`Status::name_in`]).
    pub const fn name(&self) -> &'static str {
        match (self.sct, self.sc) {
            (sct::GENERIC, sc) => match sc {
                0x00 => "Successful Completion",
                0x01 => "Invalid Command Opcode",
                0x02 => "Invalid Field in Command",
                0x03 => "Command ID Conflict",
                0x04 => "Data Transfer Error",
                0x05 => "Commands Aborted due to Power Loss Notification",
                0x06 => "Internal Error",
                0x07 => "Command Abort Requested",
                0x08 => "Command Aborted due to SQ Deletion",
                0x09 => "Command Aborted due to Failed Fused Command",
                0x0A => "Command Aborted due to Missing Fused Command",
                0x0B => "Invalid Namespace or Format",
                0x0C => "Command Sequence Error",
                0x0D => "Invalid SGL Segment Descriptor",
                0x0E => "Invalid Number of SGL Descriptors",
                0x0F => "Data SGL Length Invalid",
                0x10 => "Metadata SGL Length Invalid",
                0x11 => "SGL Descriptor Type Invalid",
                0x12 => "Invalid Use of Controller Memory Buffer",
                0x13 => "PRP Offset Invalid",
                0x14 => "Atomic Write Unit Exceeded",
                0x15 => "Operation Denied",
                0x16 => "SGL Offset Invalid",
                0x17 => "SGL Sub Type Invalid",
                0x18 => "Host Identifier Inconsistent Format",
                0x19 => "Keep Alive Timer Expired",
                0x1A => "Keep Alive Timeout Invalid",
                0x1B => "Command Aborted due to Preempt and Abort",
                0x1C => "Sanitize Failed",
                0x1D => "Sanitize In Progress",
                0x1E => "SGL Data Block Granularity Invalid",
                0x1F => "Command Not Supported for Queue in CMB",
                0x20 => "Namespace is Write Protected",
                0x21 => "Command Interrupted",
                0x22 => "Transient Transport Error",
                0x23 => "Command Prohibited by Command and Feature Lockdown",
                0x24 => "Admin Command Media Not Ready",
                0x80 => "LBA Out of Range",
                0x81 => "Capacity Exceeded",
                0x82 => "Namespace Not Ready",
                0x83 => "Reservation Conflict",
                0x84 => "Format In Progress",
                _ => "Unknown Generic Status",
            },
            (sct::COMMAND_SPECIFIC, sc) => match sc {
                0x00 => "Completion Queue Invalid",
                0x01 => "Invalid Queue Identifier",
                0x02 => "Invalid Queue Size",
                0x03 => "Abort Command Limit Exceeded",
                0x05 => "Asynchronous Event Request Limit Exceeded",
                0x06 => "Invalid Firmware Slot",
                0x07 => "Invalid Firmware Image",
                0x08 => "Invalid Interrupt Vector",
                0x09 => "Invalid Log Page",
                0x0A => "Invalid Format",
                0x0B => "Firmware Activation Requires Conventional Reset",
                0x0C => "Invalid Queue Deletion",
                0x0D => "Feature Identifier Not Saveable",
                0x0E => "Feature Not Changeable",
                0x0F => "Feature Not Namespace Specific",
                0x10 => "Firmware Activation Requires NVM Subsystem Reset",
                0x11 => "Firmware Activation Requires Controller Level Reset",
                0x12 => "Firmware Activation Requires Maximum Time Violation",
                0x13 => "Firmware Activation Prohibited",
                0x14 => "Overlapping Range",
                0x15 => "Namespace Insufficient Capacity",
                0x16 => "Namespace Identifier Unavailable",
                0x18 => "Namespace Already Attached",
                0x19 => "Namespace Is Private",
                0x1A => "Namespace Not Attached",
                0x1B => "Thin Provisioning Not Supported",
                0x1C => "Controller List Invalid",
                0x1D => "Device Self-test In Progress",
                0x1E => "Boot Partition Write Prohibited",
                0x1F => "Invalid Controller Identifier",
                0x20 => "Invalid Secondary Controller State",
                0x21 => "Invalid Number of Controller Resources",
                0x22 => "Invalid Resource Identifier",
                0x23 => "Sanitize Prohibited While Persistent Memory Region is Enabled",
                0x24 => "ANA Group Identifier Invalid",
                0x25 => "ANA Attach Failed",
                0x80 => "Conflicting Attributes",
                0x81 => "Invalid Protection Information",
                0x82 => "Attempted Write to Read Only Range",
                0x83 => "Command Size Limit Exceeded",
                0x84 => "Connect Invalid Host",
                0x85 => "Invalid Queue Type",
                0x90 => "Discover Restart",
                0x91 => "Authentication Required",
                _ => "Unknown Command Specific Status",
            },
            (sct::MEDIA, sc) => match sc {
                0x80 => "Write Fault",
                0x81 => "Unrecovered Read Error",
                0x82 => "End-to-end Guard Check Error",
                0x83 => "End-to-end Application Tag Check Error",
                0x84 => "End-to-end Reference Tag Check Error",
                0x85 => "Compare Failure",
                0x86 => "Access Denied",
                0x87 => "Deallocated or Unwritten Logical Block",
                0x88 => "End-to-end Storage Tag Check Error",
                _ => "Unknown Media Error",
            },
            (sct::PATH, sc) => match sc {
                0x00 => "Internal Path Error",
                0x01 => "Asymmetric Access Persistent Loss",
                0x02 => "Asymmetric Access Inaccessible",
                0x03 => "Asymmetric Access Transition",
                0x60 => "Controller Pathing Error",
                0x70 => "Host Pathing Error",
                0x71 => "Command Aborted By Host",
                _ => "Unknown Path Related Status",
            },
            (sct::VENDOR, _) => "Vendor Specific",
            _ => "Unknown Status Code Type",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sct {:#x} sc {:#04x}",
            self.name(),
            self.sct,
            self.sc
        )?;
        if self.crd != 0 {
            write!(f, " crd {}", self.crd)?;
        }
        if self.more {
            f.write_str(" more")?;
        }
        if self.dnr {
            f.write_str(" dnr")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_layout() {
        // Invalid Field in Command with DNR, phase 1: SC 02h at bits 8:1,
        // SCT 0, DNR bit 15, P bit 0.
        assert_eq!(Status::INVALID_FIELD.with_dnr().to_word(true), 0x8005);
        // Connect Invalid Host: SCT 1 at bits 11:9, SC 84h.
        assert_eq!(
            Status::CONNECT_INVALID_HOST.to_word(false),
            (1 << 9) | (0x84 << 1)
        );
        // Unrecovered read error: SCT 2, SC 81h.
        assert_eq!(Status::UNRECOVERED_READ_ERROR.to_word(false), 0x0502);
        // CRD 3 and More.
        assert_eq!(
            Status::SUCCESS.with_crd(3).with_more().to_word(false),
            0x7000
        );
        assert_eq!(Status::SUCCESS.to_word(true), 1);
    }

    #[test]
    fn word_round_trip_all() {
        for w in 0..=u16::MAX {
            let s = Status::from_word(w);
            assert_eq!(s.to_word(w & 1 != 0), w);
        }
    }

    #[test]
    fn names_and_display() {
        assert_eq!(Status::SUCCESS.name(), "Successful Completion");
        assert!(Status::SUCCESS.is_success());
        assert!(Status::SUCCESS.with_dnr().is_success());
        assert!(!Status::INTERNAL.is_success());
        assert_eq!(
            Status::CONNECT_INVALID_PARAMETERS.name_in(true),
            "Connect Invalid Parameters"
        );
        assert_eq!(
            Status::CONNECT_INVALID_PARAMETERS.name_in(false),
            "Attempted Write to Read Only Range"
        );
        assert_eq!(
            Status::LBA_OUT_OF_RANGE.with_dnr().to_string(),
            "LBA Out of Range (sct 0x0 sc 0x80 dnr)"
        );
        assert!(Status::INVALID_LOG_PAGE.same_code(Status::INVALID_LOG_PAGE.with_dnr()));
    }
}
