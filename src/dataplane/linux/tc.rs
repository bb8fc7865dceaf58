//! The isolation guard ([`crate::plan::guard`]) on the interface, through
//! rtnetlink traffic control: a `clsact` qdisc, and at each of its ingress
//! and egress hooks one direct-action classic-BPF filter at preference 1,
//! handle 1: the first to run, and its verdict ends the hook. sixpn owns the
//! interface whole, so whatever sits at that place is replaced; nothing is
//! done on any other link.
//!
//! rtnetlink's request builders can't carry a classic program, so the
//! messages are built here and sent through `Handle::request`.

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    DefaultNla, NetlinkMessage, NetlinkPayload, Nla, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption, TcStats2,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

use super::super::KernelError;
use super::{rtnl_errno, rtnl_error};
use crate::plan::guard::{encode, PROGRAM};

/// `TCA_BPF_OPS_LEN` and `TCA_BPF_OPS` (linux/pkt_cls.h): a classic
/// program, which netlink-packet-route has no variant for.
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;
/// `ETH_P_ALL` in network byte order, as `tcm_info`'s low half holds it.
const ALL_PROTOCOLS: u16 = 0x0003u16.to_be();
const PREF: u16 = 1;
const FILTER_HANDLE: u32 = 1;

/// The two hooks of the `clsact` qdisc.
const HOOKS: [(&str, u16); 2] = [
    ("ingress", TcHandle::MIN_INGRESS),
    ("egress", TcHandle::MIN_EGRESS),
];

fn hook(minor: u16) -> TcHandle {
    TcHandle {
        major: 0xffff,
        minor,
    }
}

/// Sends `msg` and waits for the kernel's answer.
async fn request(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut answers = handle.clone().request(req)?;
    while let Some(m) = answers.next().await {
        if let NetlinkPayload::Error(e) = m.payload {
            if e.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
    }
    Ok(())
}

/// Whether the guard is attached at both hooks of link `index`, exactly as
/// rendered: one filter at each, ours, carrying [`PROGRAM`].
pub(super) async fn guarded(handle: &Handle, index: u32) -> Result<bool, KernelError> {
    let want = encode(&PROGRAM);
    for (name, minor) in HOOKS {
        let mut get = handle.traffic_filter(index as i32).get();
        get = if minor == TcHandle::MIN_INGRESS {
            get.ingress()
        } else {
            get.egress()
        };
        let filters: Vec<TcMessage> = match get.execute().try_collect().await {
            Ok(f) => f,
            // No clsact qdisc (EINVAL), or the link is gone.
            Err(e) if matches!(rtnl_errno(&e), Some(libc::EINVAL | libc::ENODEV)) => {
                return Ok(false)
            }
            Err(e) => {
                return Err(rtnl_error(
                    format!("list {name} filters of link {index}"),
                    &e,
                ))
            }
        };
        // Preference 1 runs first, and a direct-action verdict ends the
        // hook: whatever else is there never sees a packet.
        let first = filters
            .iter()
            .filter(|f| TcHandle::from(f.header.info).major == PREF);
        if !first.into_iter().any(|f| carries(f, &want)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether filter `f` is a direct-action bpf filter running `program`.
fn carries(f: &TcMessage, program: &[u8]) -> bool {
    let kind = f
        .attributes
        .iter()
        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
    let mut ops = None;
    let mut direct = false;
    for a in &f.attributes {
        let TcAttribute::Options(opts) = a else {
            continue;
        };
        for o in opts {
            match o {
                TcOption::Bpf(TcFilterBpfOption::Flags(fl)) => {
                    direct = fl.contains(TcBpfFlags::DirectAction);
                }
                TcOption::Bpf(TcFilterBpfOption::Other(nla)) if nla.kind() == TCA_BPF_OPS => {
                    let mut v = vec![0; nla.value_len()];
                    nla.emit_value(&mut v);
                    ops = Some(v);
                }
                _ => {}
            }
        }
    }
    kind && direct && ops.as_deref() == Some(program)
}

/// Attaches the guard to link `index`: the `clsact` qdisc if missing, then
/// the filter at each hook, replacing whatever is at its place.
pub(super) async fn attach(handle: &Handle, index: u32) -> Result<(), KernelError> {
    let mut qdisc = TcMessage::with_index(index as i32);
    qdisc.header.parent = TcHandle::CLSACT;
    qdisc.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    qdisc
        .attributes
        .push(TcAttribute::Kind("clsact".to_owned()));
    match request(
        handle,
        RouteNetlinkMessage::NewQueueDiscipline(qdisc),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .await
    {
        Ok(()) => {}
        Err(e) if rtnl_errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(rtnl_error(
                format!("add the clsact qdisc to link {index} (for the isolation guard)"),
                &e,
            ))
        }
    }
    let program = encode(&PROGRAM);
    let len = u16::try_from(PROGRAM.len()).unwrap_or(u16::MAX);
    for (name, minor) in HOOKS {
        let mut f = TcMessage::with_index(index as i32);
        f.header.parent = hook(minor);
        f.header.handle = FILTER_HANDLE.into();
        f.header.info = u32::from(TcHandle {
            major: PREF,
            minor: ALL_PROTOCOLS,
        });
        f.attributes.push(TcAttribute::Kind("bpf".to_owned()));
        f.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
                TCA_BPF_OPS_LEN,
                len.to_ne_bytes().to_vec(),
            ))),
            TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
                TCA_BPF_OPS,
                program.clone(),
            ))),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        request(
            handle,
            RouteNetlinkMessage::NewTrafficFilter(f),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|e| {
            rtnl_error(
                format!("attach the isolation guard at {name} of link {index}"),
                &e,
            )
        })?;
    }
    Ok(())
}

/// Packets the guard dropped on link `index` (both hooks): the `clsact`
/// qdisc's drop counter, which counts exactly the guard's verdicts, since
/// the guard is the only filter whose verdict is a drop. None: no qdisc.
pub(super) async fn dropped(handle: &Handle, index: u32) -> Result<Option<u64>, KernelError> {
    let qdiscs: Vec<TcMessage> = handle
        .qdisc()
        .get()
        .index(index as i32)
        .execute()
        .try_collect()
        .await
        .map_err(|e| rtnl_error(format!("list qdiscs of link {index}"), &e))?;
    let clsact = qdiscs.iter().find(|q| {
        q.header.index == index as i32
            && q.attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
    });
    let Some(q) = clsact else { return Ok(None) };
    let from_stats2 = q.attributes.iter().find_map(|a| match a {
        TcAttribute::Stats2(s) => s.iter().find_map(|s| match s {
            TcStats2::Queue(q) => Some(u64::from(q.drops)),
            _ => None,
        }),
        _ => None,
    });
    let from_stats = q.attributes.iter().find_map(|a| match a {
        TcAttribute::Stats(s) => Some(u64::from(s.drops)),
        _ => None,
    });
    Ok(from_stats2.or(from_stats).or(Some(0)))
}
