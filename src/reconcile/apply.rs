//! Carrying out a pass: observe the kernel where the cache is stale, run
//! the firewall step first (fail closed), plan, and apply the plan through
//! the adapters, counting what took effect into the cache and counters.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use tracing::info;
use tracing::warn;

use super::{Need, Reconciler};
use crate::dataplane::{KernelError, MTU};
use crate::model::{OrgPrefix, PeerNet};
use crate::plan::nft::{self, FirewallPlan};
use crate::plan::{self, Desired, Plan, Touched};

impl Reconciler {
    async fn observe(&mut self, need: Need) -> Result<(), Vec<KernelError>> {
        if need.wg || self.cache.device.is_none() {
            let t0 = std::time::Instant::now();
            self.cache.device = self.wg.get().await.map_err(|e| vec![e])?;
            let took = t0.elapsed();
            self.schedule.wg_read_took(took);
        }
        if need.net || self.cache.link.is_none() {
            let name = self.settings.interface.as_str();
            self.cache.link = self.nl.link(name).await.map_err(|e| vec![e])?;
            if let Some(link) = self.cache.link {
                self.cache.addresses = self
                    .nl
                    .addresses(link.index)
                    .await
                    .map_err(|e| vec![e])?
                    .into_iter()
                    .collect();
                self.cache.routes = self
                    .nl
                    .routes(link.index)
                    .await
                    .map_err(|e| vec![e])?
                    .into_iter()
                    .collect();
            }
            if self.nl.ensure_forwarding().await.map_err(|e| vec![e])? {
                warn!("IPv6 forwarding was off; turned it on (net.ipv6.conf.all.forwarding=1)");
            }
        }
        Ok(())
    }

    /// The firewall step: observe (if stale) → plan → apply. On failure the
    /// previous table is still in force (each change is one transaction),
    /// and the next step replaces the table whole.
    /// `touched`: only these orgs changed since the table last matched.
    async fn firewall(
        &mut self,
        desired: Option<&Desired>,
        fresh: bool,
        store_changed: bool,
        touched: Option<&BTreeSet<OrgPrefix>>,
    ) -> Result<(), Vec<KernelError>> {
        if fresh || self.fw_cache.is_none() {
            let t0 = std::time::Instant::now();
            self.fw_cache = Some(self.fw.observe().await.map_err(|e| vec![e])?);
            self.schedule.fw_read_took(t0.elapsed());
        }
        let seen = self.fw_cache.as_ref().and_then(Option::as_ref);
        let interface = self.settings.interface.as_str();
        let capture = self.settings.capture;
        let plan = match (desired, touched) {
            (Some(d), Some(t)) if !fresh => nft::plan_firewall_touched(
                interface,
                capture,
                &d.orgs,
                seen,
                self.fw_force_replace,
                t,
            ),
            _ => nft::plan_firewall(
                interface,
                capture,
                desired.map(|d| &d.orgs),
                seen,
                self.fw_force_replace,
            ),
        };
        let result = match &plan {
            FirewallPlan::Nothing => return Ok(()),
            FirewallPlan::Replace { ruleset, reason } => {
                let r = self.fw.replace(ruleset).await;
                if r.is_ok() {
                    info!(
                        reason,
                        orgs = ruleset.orgs.len(),
                        "isolation ruleset installed (table inet sixpn)"
                    );
                }
                r
            }
            FirewallPlan::Update { add, remove } => {
                let r = self.fw.update_elements(add, remove).await;
                if r.is_ok() {
                    if add.len() + remove.len() <= 8 {
                        for (p, org) in add {
                            info!(%org, prefix = %p, "org added to the isolation set");
                        }
                        for (a, _) in remove {
                            info!(prefix = %a, "element removed from the isolation set");
                        }
                    } else {
                        info!(
                            added = add.len(),
                            removed = remove.len(),
                            "isolation set updated"
                        );
                    }
                }
                r
            }
        };
        match result {
            Ok(()) => {
                self.counters
                    .firewall_changes
                    .fetch_add(1, Ordering::Relaxed);
                self.counters.changes.fetch_add(1, Ordering::Relaxed);
                if !store_changed {
                    info!("repaired the isolation firewall");
                    self.counters.drift_repairs.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(cached) = self.fw_cache.as_mut() {
                    nft::apply_firewall_to(cached, &plan);
                }
                self.fw_force_replace = false;
                Ok(())
            }
            Err(e) => {
                self.fw_cache = None;
                self.fw_force_replace = true;
                Err(vec![e])
            }
        }
    }

    /// A store change followed write by write: the firewall elements, peers,
    /// addresses and routes it touched, against the cache (which matched
    /// the kernel after the last pass).
    pub(super) async fn follow_plan_apply(
        &mut self,
        desired: Option<&Desired>,
        touched: &Touched,
    ) -> Result<(), Vec<KernelError>> {
        let Some(want) = desired else {
            return self.observe_plan_apply(Need::ALL, true, desired).await;
        };
        self.counters.followed.fetch_add(1, Ordering::Relaxed);
        self.firewall(desired, false, true, Some(&touched.orgs))
            .await?;
        let me = self.settings.identity;
        let mut plan = plan::plan_touched(want, &self.cache, &me, touched);
        self.cap(&mut plan);
        if plan.create_interface {
            // The cache has lost the interface: not a case to follow.
            return self.observe_plan_apply(Need::ALL, true, desired).await;
        }
        let errors = self.apply_and_count(&plan, desired, true).await;
        self.publish_touched(want, touched, errors.is_empty());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Keeps the plan within the backend's peer cap (wireguard-go's): the
    /// peers that don't fit are not tried (they would be refused on every
    /// retry) and stay missing, so the gateway never reports in sync; one
    /// error line says so whenever the shortfall changes.
    fn cap(&mut self, plan: &mut Plan) {
        let (Some(cap), Some(device)) = (self.wg.max_peers(), self.cache.device.as_ref()) else {
            return;
        };
        let dropped = plan::cap_new_peers(plan, device, cap);
        if dropped != self.over_cap {
            self.over_cap = dropped;
            if dropped > 0 {
                tracing::error!(
                    left_out = dropped,
                    cap,
                    backend = self.wg.backend_name(),
                    "more peers registered here than the backend holds: use the kernel module \
                     (backend = \"kernel\") or peers = \"jit\""
                );
            }
        }
    }

    /// Carries out `plan` and counts what took effect into the counters and
    /// the cache; returns what failed.
    async fn apply_and_count(
        &mut self,
        plan: &Plan,
        desired: Option<&Desired>,
        store_changed: bool,
    ) -> Vec<KernelError> {
        if plan.is_empty() {
            return Vec::new();
        }
        if !store_changed {
            info!(changes = plan.len(), "repairing drift");
        }
        let (done, errors) = self.apply(plan, desired).await;
        // Count what happened: a change that keeps failing (a foreign route
        // in the way) must not count again on every retry.
        let n = done.len() as u64;
        self.counters.changes.fetch_add(n, Ordering::Relaxed);
        if !store_changed {
            self.counters.drift_repairs.fetch_add(n, Ordering::Relaxed);
        }
        plan::apply_to(&mut self.cache, &done, &self.settings.identity);
        errors
    }

    pub(super) async fn observe_plan_apply(
        &mut self,
        need: Need,
        store_changed: bool,
        desired: Option<&Desired>,
    ) -> Result<(), Vec<KernelError>> {
        // First, and nothing else until it is in: fail closed.
        self.firewall(desired, need.fw, store_changed, None).await?;
        self.observe(need).await?;
        let me = self.settings.identity;
        let mut plan = plan::plan(desired, &self.cache, &me);
        if plan.create_interface {
            info!(
                backend = self.wg.backend_name(),
                "creating the WireGuard interface"
            );
            self.wg.ensure().await.map_err(|e| vec![e])?;
            self.observe(Need::ALL).await?;
            plan = plan::plan(desired, &self.cache, &me);
            if plan.create_interface {
                return Err(vec![KernelError::new(
                    format!("create interface {}", self.settings.interface),
                    "the interface is still missing after creating it",
                )]);
            }
        }
        self.cap(&mut plan);
        let errors = self.apply_and_count(&plan, desired, store_changed).await;
        // Also after a partial failure: the peers that did go in are live,
        // and the API is waiting for them.
        self.publish(desired, errors.is_empty());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Carries out `plan`. One failed item doesn't stop the others. Returns
    /// the part of the plan that took effect, and what failed.
    /// The WireGuard part and the netlink part go to different kernel
    /// interfaces and don't depend on each other (a route to a /120 whose
    /// peer isn't in yet just drops, as it would without the route), so
    /// they run side by side: a bulk install takes the longer of the two,
    /// not their sum.
    async fn apply(&self, plan: &Plan, desired: Option<&Desired>) -> (Plan, Vec<KernelError>) {
        let Some(link) = self.cache.link else {
            return (
                Plan::default(),
                vec![KernelError::new("apply", "interface vanished")],
            );
        };
        let ((wg, mut errors), (mut done, net_errors)) = tokio::join!(
            self.apply_wg(plan, desired),
            self.apply_net(plan, desired, link.index)
        );
        errors.extend(net_errors);
        done.configure_device = wg.configure_device;
        done.upsert_peers = wg.upsert_peers;
        done.remove_peers = wg.remove_peers;
        (done, errors)
    }

    /// The device and its peers; returns what took effect and what failed.
    async fn apply_wg(&self, plan: &Plan, desired: Option<&Desired>) -> (Plan, Vec<KernelError>) {
        let mut errors = Vec::new();
        let mut done = Plan::default();
        if plan.configure_device {
            match self
                .wg
                .configure(
                    &self.settings.private_key,
                    self.settings.identity.listen_port,
                )
                .await
            {
                Ok(()) => {
                    done.configure_device = true;
                    info!(
                        listen_port = self.settings.identity.listen_port,
                        public_key = %self.settings.identity.public_key,
                        "WireGuard device configured"
                    );
                }
                Err(e) => errors.push(e),
            }
        }
        if !plan.upsert_peers.is_empty() || !plan.remove_peers.is_empty() {
            match self
                .wg
                .update_peers(&plan.upsert_peers, &plan.remove_peers)
                .await
            {
                Ok(()) => {
                    done.upsert_peers.clone_from(&plan.upsert_peers);
                    done.remove_peers.clone_from(&plan.remove_peers);
                    // A bulk change is one line; each peer at debug.
                    let (ups, rms) = (plan.upsert_peers.len(), plan.remove_peers.len());
                    let each = ups + rms <= 8;
                    for u in &plan.upsert_peers {
                        match desired.and_then(|d| d.installed.get(&u.public_key)) {
                            Some(p) if each => info!(org = %p.org, peer = %p.name, net = %u.net,
                                "peer installed"),
                            Some(p) => tracing::debug!(org = %p.org, peer = %p.name, net = %u.net,
                                "peer installed"),
                            None if each => {
                                info!(key = %u.public_key, net = %u.net, "peer installed")
                            }
                            None => {
                                tracing::debug!(key = %u.public_key, net = %u.net, "peer installed")
                            }
                        }
                    }
                    for k in &plan.remove_peers {
                        if each {
                            info!(key = %k, "peer removed");
                        } else {
                            tracing::debug!(key = %k, "peer removed");
                        }
                    }
                    if !each {
                        info!(installed = ups, removed = rms, "peers updated");
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        (done, errors)
    }

    /// The link, addresses and routes; returns what took effect and what
    /// failed.
    async fn apply_net(
        &self,
        plan: &Plan,
        desired: Option<&Desired>,
        index: u32,
    ) -> (Plan, Vec<KernelError>) {
        let mut errors = Vec::new();
        let mut done = Plan::default();
        // The guard first: it holds before the link carries a packet.
        if plan.guard {
            match self.nl.attach_guard(index).await {
                Ok(()) => {
                    done.guard = true;
                    info!("isolation guard attached (tc ingress and egress)");
                }
                Err(e) => errors.push(e),
            }
        }
        if plan.link_up {
            match self.nl.set_link_up(index, MTU).await {
                Ok(()) => {
                    done.link_up = true;
                    info!(mtu = MTU, "interface up");
                }
                Err(e) => errors.push(e),
            }
        }
        for a in &plan.add_addresses {
            match self.nl.add_address(index, *a).await {
                Ok(()) => {
                    done.add_addresses.push(*a);
                    info!(address = %a, "org DNS address added");
                }
                Err(e) => errors.push(e),
            }
        }
        for (a, len) in &plan.remove_addresses {
            match self.nl.del_address(index, *a, *len).await {
                Ok(()) => {
                    done.remove_addresses.push((*a, *len));
                    info!(address = %a, "org DNS address removed");
                }
                Err(e) => errors.push(e),
            }
        }
        if !plan.add_routes.is_empty() {
            let results = self.nl.add_routes(index, &plan.add_routes).await;
            // Failures name the peer: the operator has to find whose traffic
            // a route in the way (someone else's) is taking.
            let peers: HashMap<_, _> = match desired {
                Some(d) if results.iter().any(Result::is_err) => d
                    .installed
                    .values()
                    .map(|p| ((p.net.network(), PeerNet::LEN), p))
                    .collect(),
                _ => HashMap::new(),
            };
            for (r, net) in results.into_iter().zip(&plan.add_routes) {
                match r {
                    Ok(()) => done.add_routes.push(*net),
                    Err(mut e) => {
                        if let Some(p) = peers.get(net) {
                            e.op = format!("{} for peer {} of org {}", e.op, p.name, p.org);
                        }
                        errors.push(e);
                    }
                }
            }
            info!(routes = done.add_routes.len(), "peer routes added");
        }
        if !plan.remove_routes.is_empty() {
            let results = self.nl.del_routes(index, &plan.remove_routes).await;
            for (r, net) in results.into_iter().zip(&plan.remove_routes) {
                match r {
                    Ok(()) => done.remove_routes.push(*net),
                    Err(e) => errors.push(e),
                }
            }
            info!(routes = done.remove_routes.len(), "peer routes removed");
        }
        (done, errors)
    }
}
