//! The control plane's plans, turned into the program's maps: each gateway's entry (and how it
//! is reached: route and neighbour), each listener's Maglev slots and addresses.

use super::*;

impl FastPath {
    /// Loads a listener's plan: its gateways' entries, then its Maglev table.
    pub(super) fn apply(&mut self, index: usize, plan: Arc<ListenerPlan>) -> anyhow::Result<()> {
        self.listeners[index].plan = plan.clone();
        if !self.listeners[index].served {
            return Ok(());
        }
        self.program
            .set_mac1(index as u32, plan.mac1.unwrap_or_default())?;
        let placement = &plan.placement;
        let mut current = HashMap::new();
        let mut lost_sessions = false;
        let mut losing = Vec::new();
        for gateway in placement.gateways() {
            // Retired slots are on their way out, whatever they held.
            let live = |slot_index: &u32| !self.retired.contains(slot_index);
            let slot = self.gateways.iter().find(|(slot_index, s)| {
                live(slot_index)
                    && s.listener == index
                    && s.id == gateway.id
                    && s.address == gateway.address
            });
            let slot_index = match slot {
                Some((&slot_index, _)) => slot_index,
                None => {
                    // Within a listener addresses are unique (the configuration sees to it); a
                    // slot of its own with this address belongs to a gateway that moved away.
                    if let Some(other) = self.gateways.iter().find_map(|(slot_index, s)| {
                        (live(slot_index) && s.listener != index && s.address == gateway.address)
                            .then_some(s)
                    }) {
                        bail!(
                            "gateway `{}` has the address {} of gateway `{}` of listener `{}`: the program tells gateways apart by address",
                            gateway.name,
                            gateway.address,
                            other.name,
                            self.listeners[other.listener].name
                        );
                    }
                    let slot_index = self
                        .free
                        .pop()
                        .with_context(|| format!("more than {MAX_GATEWAYS} gateways"))?;
                    self.gateways.insert(
                        slot_index,
                        GatewaySlot {
                            listener: index,
                            id: gateway.id,
                            name: gateway.name.clone(),
                            address: gateway.address,
                            keeps: false,
                            path: None,
                            next_hop_mac: None,
                            written: None,
                            counters: self
                                .metrics
                                .gateway(&self.listeners[index].name, &gateway.name),
                            traffic_seen: GatewayTraffic::default(),
                            sessions: 0,
                        },
                    );
                    self.refresh_path(slot_index, &HashMap::new());
                    slot_index
                }
            };
            let slot = self.gateways.get_mut(&slot_index).expect("just found");
            let keeps = placement.keeps(gateway.id, gateway.address);
            if slot.keeps && !keeps {
                losing.push(slot_index);
            }
            lost_sessions |= slot.keeps && !keeps;
            slot.keeps = keeps;
            slot.name = gateway.name.clone();
            current.insert(gateway.id, slot_index);
        }
        let gone: Vec<u32> = self
            .gateways
            .iter()
            .filter(|(slot_index, s)| {
                s.listener == index
                    && current.get(&s.id) != Some(slot_index)
                    && !self.retired.contains(slot_index)
            })
            .map(|(&slot_index, _)| slot_index)
            .collect();
        losing.extend(&gone);
        // Before the program stops keeping them: it would place their clients anew at their
        // next packet, with no handshake to bring them back.
        // Reading the session table is worth it only when some gateway can be ordered.
        if self.agents.any_attached(&self.listeners[index].name) {
            let _ = self.rehome(index, &losing);
        }
        for slot_index in gone {
            lost_sessions = true;
            self.retire(slot_index)?;
        }
        for slot_index in current.values() {
            self.write_gateway(*slot_index)?;
        }
        let entries = maglev_entries(placement, |g| current[&g.id]);
        let listener = &mut self.listeners[index];
        if entries.len() as u32 > listener.maglev_room {
            bail!(
                "{} Maglev slots do not fit the {} loaded at start (restart to change maglev_size)",
                entries.len(),
                listener.maglev_room
            );
        }
        let changed = entries
            .iter()
            .enumerate()
            .filter(|(slot, entry)| listener.maglev.get(*slot) != Some(entry))
            .map(|(slot, entry)| (slot, *entry));
        self.program
            .set_maglev_slots(listener.maglev_offset, changed)?;
        listener.maglev = entries;
        let info = listener_info(index, listener);
        self.program.set_listener(&listener.addresses, &[], info)?;
        if lost_sessions {
            // Evicted at once, not at their next packet: the userspace datapath does the same.
            self.sweep();
        }
        Ok(())
    }

    /// Leaves a listener to the userspace datapath: the program stops matching its addresses,
    /// so its packets reach the listener socket; its gateways are retired, and the next sweep
    /// removes its sessions from the program's table (their clients go on through userspace).
    pub(super) fn unserve(&mut self, index: usize, reason: &str) {
        let listener = &mut self.listeners[index];
        tracing::error!(listener = %listener.name, "the XDP program no longer serves this listener, the userspace datapath does: {reason}");
        listener.served = false;
        let gone = std::mem::take(&mut listener.addresses);
        for address in &gone {
            self.metrics
                .set_xdp_listener_address(&listener.name, *address, false);
        }
        let info = listener_info(index, listener);
        let mut result = self.program.set_listener(&[], &gone, info);
        let slots: Vec<u32> = self
            .gateways
            .iter()
            .filter(|(slot_index, s)| s.listener == index && !self.retired.contains(slot_index))
            .map(|(&slot_index, _)| slot_index)
            .collect();
        for slot_index in slots {
            result = result.and(self.retire(slot_index));
        }
        if let Err(e) = result {
            tracing::error!(listener = %self.listeners[index].name, "cannot take the listener out of the XDP program: {e:#}");
        }
    }

    /// Takes a gateway out of the program: its replies are no longer recognised and its sessions
    /// no longer kept; the next sweep removes them and frees its index.
    pub(super) fn retire(&mut self, slot_index: u32) -> anyhow::Result<()> {
        let slot = self.gateways.get_mut(&slot_index).expect("a slot");
        slot.keeps = false;
        slot.written = None;
        self.retired.push(slot_index);
        self.program
            .clear_gateway(slot_index, endpoint_of(slot.address))
    }

    /// Writes a gateway's entry if it changed.
    pub(super) fn write_gateway(&mut self, slot_index: u32) -> anyhow::Result<()> {
        let slot = self.gateways.get_mut(&slot_index).expect("a slot");
        let entry = slot.entry();
        if slot.written != Some(entry) {
            self.program.set_gateway(slot_index, entry)?;
            slot.written = Some(entry);
            let ready = entry.flags & GATEWAY_READY != 0;
            self.metrics.set_xdp_ready(
                &self.listeners[slot.listener].name,
                &slot.name,
                Some(ready),
            );
        }
        Ok(())
    }

    /// Asks the kernel how every gateway is reached now.
    pub(super) fn refresh_paths(&mut self) -> anyhow::Result<()> {
        let neighbours = self.netlink.neighbours()?;
        let live: Vec<u32> = self
            .gateways
            .keys()
            .filter(|i| !self.retired.contains(i))
            .copied()
            .collect();
        for slot_index in live {
            self.refresh_path(slot_index, &neighbours);
            self.write_gateway(slot_index)?;
        }
        Ok(())
    }

    pub(super) fn refresh_path(
        &mut self,
        slot_index: u32,
        neighbours: &HashMap<(u32, IpAddr), [u8; 6]>,
    ) {
        let slot = self.gateways.get_mut(&slot_index).expect("a slot");
        let source = self.listeners[slot.listener].source;
        match self.netlink.path_to(slot.address.ip(), source) {
            Ok(path) => {
                if slot
                    .path
                    .is_some_and(|p| (p.ifindex, p.next_hop) != (path.ifindex, path.next_hop))
                {
                    slot.next_hop_mac = None;
                }
                if slot.path != Some(path) {
                    tracing::info!(gateway = %slot.name, interface = path.ifindex, next_hop = %path.next_hop, source = %path.source, "route to the gateway");
                }
                slot.path = Some(path);
                // A neighbour entry that disappeared keeps its last MAC: the kernel forgets
                // entries that only XDP traffic uses.
                if let Some(mac) = neighbours.get(&(path.ifindex, path.next_hop)) {
                    slot.next_hop_mac = Some(*mac);
                }
            }
            Err(e) => {
                if slot.path.is_some() {
                    tracing::warn!(gateway = %slot.name, "no route to the gateway, its traffic goes through userspace: {e:#}");
                }
                slot.path = None;
            }
        }
    }

    /// The addresses each served listener answers on: its own, or for a wildcard every local
    /// address of its family.
    pub(super) fn refresh_addresses(&mut self, local: &[IpAddr]) -> anyhow::Result<()> {
        for index in 0..self.listeners.len() {
            let listener = &self.listeners[index];
            if !listener.served {
                continue;
            }
            let wanted = wanted_addresses(listener, local);
            if wanted == listener.addresses {
                continue;
            }
            let gone: Vec<SocketAddr> = listener
                .addresses
                .iter()
                .filter(|a| !wanted.contains(a))
                .copied()
                .collect();
            tracing::info!(listener = %listener.name, addresses = ?wanted, "XDP listener addresses");
            let info = listener_info(index, listener);
            self.program.set_listener(&wanted, &gone, info)?;
            for (addresses, served) in [(&gone, false), (&wanted, true)] {
                for address in addresses {
                    self.metrics
                        .set_xdp_listener_address(&listener.name, *address, served);
                }
            }
            self.listeners[index].addresses = wanted;
        }
        Ok(())
    }
}

/// The addresses the program answers `listener`'s clients on, of the machine's `local` ones: a
/// wildcard listener's are every local address of its family.
pub(super) fn wanted_addresses(listener: &Listener, local: &[IpAddr]) -> Vec<SocketAddr> {
    if listener.listen.ip().is_unspecified() {
        local
            .iter()
            .filter(|ip| ip.is_ipv4() == listener.listen.is_ipv4())
            .map(|ip| SocketAddr::new(*ip, listener.listen.port()))
            .collect()
    } else {
        vec![listener.listen]
    }
}
