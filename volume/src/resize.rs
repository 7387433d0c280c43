//! `plexctl volume resize`: a volume grows while in use, plexes first, then the mirror.

use crate::rpc::EAGAIN;
use crate::state::PlexRecord;
use crate::{mirror_of, node_err, size, Cluster, Error, Report, REJOIN_DEADLINE};
use serde_json::json;
use std::time::{Duration, Instant};

impl Cluster {
    /// Grows volume `name` to `new_size` bytes while it stays in use: every plex's lvol first,
    /// then the mirror (once its owner sees every plex in sync grown; a remote plex's size
    /// arrives with its namespace-changed event), whose namespace then tells connected hosts.
    /// A plex whose node does not answer is grown when it rejoins.
    pub fn resize(&mut self, name: &str, new_size: u64) -> Result<Report, Error> {
        let mut st = self.state()?;
        let mut rec = Self::record(&st, name)?;
        self.needs_lvols("resizes")?;
        if new_size <= rec.size {
            return Err(Error::Invalid(format!(
                "{} is not more than the volume's {}: volumes only grow",
                size::human(new_size),
                size::human(rec.size)
            )));
        }
        let mut oc = self.client(&rec.owner)?;
        let m = mirror_of(&mut oc, name).map_err(node_err(&rec.owner))?;
        let bs = m["block_size"].as_u64().unwrap_or(size::BLOCK_SIZE);
        let offset = m["data_offset_blocks"].as_u64().unwrap_or(0) * bs;
        let max = m["max_num_blocks"].as_u64().unwrap_or(0) * bs;
        let data = new_size.next_multiple_of(1 << 20);
        if data > max {
            return Err(Error::Refused(format!(
                "volume {name} can grow to {} at most: its mirror's bitmap was sized at creation",
                size::human(max)
            )));
        }
        let plex_size = (offset + data).max(rec.plex_size);
        let mut report = Report::default();
        self.say(&format!(
            "growing volume {name} from {} to {} (plexes of {})",
            size::human(rec.size),
            size::human(new_size),
            size::human(plex_size)
        ));
        for p in rec.plexes.clone() {
            if let Err(e) = self.grow_plex(&p, plex_size) {
                self.warn(
                    &mut report,
                    format!("{e}; plex {} grows when it rejoins", p.bdev),
                );
            }
        }
        rec.plex_size = plex_size;
        // The owner may not have heard of a remote plex's growth yet.
        let t0 = Instant::now();
        let params = json!({"name": name, "size_in_mib": data >> 20});
        loop {
            match oc.call("bdev_mirror_resize", params.clone()) {
                Ok(_) => break,
                Err(e) if e.code() == Some(EAGAIN) && t0.elapsed() < REJOIN_DEADLINE => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    // The plexes stay grown (harmless); record it so a retry sizes from there.
                    let owner = rec.owner.clone();
                    st.state.volumes.insert(name.to_string(), rec);
                    st.save().map_err(Error::Files)?;
                    return Err(node_err(&owner)(e));
                }
            }
        }
        let m = mirror_of(&mut oc, name).map_err(node_err(&rec.owner))?;
        rec.mirror_size = m["num_blocks"].as_u64().unwrap_or(0) * bs;
        rec.generation = m["generation"].as_u64().unwrap_or(rec.generation);
        rec.size = new_size;
        self.say(&format!(
            "{}: volume {name} is {} (mirror {}); connected hosts see the new size",
            rec.owner,
            size::human(rec.size),
            size::human(rec.mirror_size)
        ));
        st.state.volumes.insert(name.to_string(), rec);
        st.save().map_err(Error::Files)?;
        Ok(report)
    }

    /// Grows plex `p`'s lvol to `plex_size` bytes if it is smaller.
    pub(crate) fn grow_plex(&mut self, p: &PlexRecord, plex_size: u64) -> Result<(), Error> {
        let mut c = self.client(&p.node)?;
        let e = node_err(&p.node);
        let b = c
            .call("bdev_get_bdevs", json!({"name": p.bdev}))
            .map_err(&e)?;
        let have =
            b[0]["num_blocks"].as_u64().unwrap_or(0) * b[0]["block_size"].as_u64().unwrap_or(0);
        if have >= plex_size {
            return Ok(());
        }
        c.call(
            "bdev_lvol_resize",
            json!({"name": p.bdev, "size_in_mib": plex_size.div_ceil(1 << 20)}),
        )
        .map_err(&e)?;
        self.say(&format!(
            "{}: plex lvol {} grown from {} to {}",
            p.node,
            p.bdev,
            size::human(have),
            size::human(plex_size)
        ));
        Ok(())
    }
}
