//! NVMe host driver.
