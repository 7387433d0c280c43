//! PCI addresses and what sysfs says about a device: its driver and its IOMMU group.

use crate::Error;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A PCI function's address, `DDDD:BB:DD.F` (the domain may be left out: `BB:DD.F`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl FromStr for PciAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadAddress(s.to_string());
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts[..] {
            [d, b, dev] => (d, b, dev),
            [b, dev] => ("0", b, dev),
            _ => return Err(bad()),
        };
        let hex = |t: &str, max: u32| {
            u32::from_str_radix(t, 16)
                .ok()
                .filter(|v| *v <= max && !t.is_empty() && t.len() <= 8)
                .ok_or_else(bad)
        };
        Ok(PciAddress {
            domain: hex(domain, u32::MAX)?,
            bus: hex(bus, 0xff)? as u8,
            device: hex(device, 0x1f)? as u8,
            function: hex(function, 7)? as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

const SYSFS_DEVICES: &str = "/sys/bus/pci/devices";

impl PciAddress {
    fn sysfs(&self) -> PathBuf {
        PathBuf::from(SYSFS_DEVICES).join(self.to_string())
    }

    /// The name of the driver bound to the device, if any; an error if there is no device.
    pub fn driver(&self) -> Result<Option<String>, Error> {
        let dir = self.sysfs();
        if !dir.exists() {
            return Err(Error::NoSuchDevice(*self));
        }
        Ok(link_name(&dir.join("driver")))
    }

    /// The device's IOMMU group, after checking that it is bound to vfio-pci.
    pub fn vfio_group(&self) -> Result<u32, Error> {
        match self.driver()? {
            Some(d) if d == "vfio-pci" => {}
            driver => {
                return Err(Error::NotBoundToVfio {
                    device: *self,
                    driver,
                })
            }
        }
        let group = link_name(&self.sysfs().join("iommu_group")).ok_or(Error::NoIommu(*self))?;
        group.parse().map_err(|_| Error::NoIommu(*self))
    }
}

/// The devices of IOMMU group `group` other than `me`, each with its driver.
pub fn group_peers(group: u32, me: &PciAddress) -> Vec<(String, Option<String>)> {
    let dir = PathBuf::from(format!("/sys/kernel/iommu_groups/{group}/devices"));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut peers: Vec<_> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| *name != me.to_string())
        .map(|name| {
            let driver = link_name(&PathBuf::from(SYSFS_DEVICES).join(&name).join("driver"));
            (name, driver)
        })
        .collect();
    peers.sort();
    peers
}

/// The last component of the symlink at `path`'s target.
fn link_name(path: &std::path::Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_or_without_a_domain() {
        let a: PciAddress = "0000:00:04.0".parse().unwrap();
        assert_eq!(a.to_string(), "0000:00:04.0");
        let b: PciAddress = "3b:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:3b:1f.7");
        let c: PciAddress = "10000:ff:00.1".parse().unwrap();
        assert_eq!((c.domain, c.bus, c.function), (0x10000, 0xff, 1));
    }

    #[test]
    fn bad_addresses_are_named() {
        for s in [
            "",
            "00:04",
            "0000:00:20.0",
            "0000:00:04.8",
            "0000:100:00.0",
            "x:y:z.0",
            ":.",
            "0:0:0:0.0",
        ] {
            let e = s.parse::<PciAddress>().unwrap_err();
            assert!(e.to_string().contains(s), "{s}: {e}");
        }
    }

    #[test]
    fn a_device_that_does_not_exist_is_said_so() {
        let a: PciAddress = "7fff:ee:1f.7".parse().unwrap();
        let e = a.vfio_group().unwrap_err();
        assert!(matches!(e, Error::NoSuchDevice(_)), "{e}");
        assert!(e.to_string().contains("7fff:ee:1f.7"), "{e}");
    }
}
