//! The `sixpn` command line (docs/architecture.md "Configuration and CLI", a contract).
//!
//! Like flyctl: positional arguments, each prompted for when missing and
//! stdin is a terminal (select lists for org and region); otherwise the
//! error names the missing argument. Every command except `gateway` talks to
//! the control API and never touches the kernel.

pub mod wgquick;

use std::io::{IsTerminal, Write};
use std::net::Ipv6Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::api::client::{Client, ClientError};
use crate::api::{AddInstance, CreatePeer, PeerState};
use crate::model::{
    AppName, HostId, InstanceId, InvalidValue, MachineId, OrgName, PeerName, PrivateKey,
    ProcessGroup, PublicKey, RegionName, TokenId,
};

/// What a CLI command can fail with; each prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A bad argument.
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
    /// A required argument is missing and can't be prompted for.
    #[error("missing argument {0} (stdin is not a terminal, so it can't be prompted for)")]
    Missing(&'static str),
    /// The API said no, or couldn't be reached.
    #[error(transparent)]
    Api(#[from] ClientError),
    /// A local file operation failed.
    #[error("{0}")]
    File(String),
    /// The prompt failed (e.g. interrupted).
    #[error("prompt failed: {0}")]
    Prompt(String),
    /// Anything else with its own message.
    #[error("{0}")]
    Other(String),
}

/// sixpn — gateway agent for private IPv6 networks over WireGuard.
#[derive(Debug, Parser)]
#[command(name = "sixpn", version, about)]
pub struct Cli {
    /// The control API: a unix socket path, http://host:port, or
    /// https://host:port (trusting $SIXPN_CA, else the system CAs).
    #[arg(
        long,
        global = true,
        env = "SIXPN_API",
        default_value = "/run/sixpn/api.sock"
    )]
    pub api: String,
    /// Print logs as JSON (gateway).
    #[arg(long, global = true)]
    pub log_json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon (root).
    Gateway {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Take over the gateway name even though the store has it under
        /// another key (a rebuilt gateway with a new key; never for a clone).
        #[arg(long)]
        take_over: bool,
    },
    /// Manage organizations.
    #[command(subcommand)]
    Orgs(OrgsCmd),
    /// Manage WireGuard peers.
    #[command(subcommand, name = "wireguard", alias = "wg")]
    Wireguard(WgCmd),
    /// Register app instances (what a scheduler would call).
    #[command(subcommand)]
    Instances(InstancesCmd),
    /// Check this host for what the gateway needs.
    Doctor {
        /// The gateway's configuration file.
        #[arg(long, short, default_value = "/etc/sixpn/gateway.toml")]
        config: PathBuf,
    },
}

/// `sixpn orgs …`.
#[derive(Debug, Subcommand)]
pub enum OrgsCmd {
    /// Create an org and allocate its network id.
    Create {
        /// The org's name.
        name: Option<String>,
    },
    /// List orgs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mint an API token that sees and changes only this org (admin only);
    /// or list or revoke the org's tokens.
    Token {
        /// The org.
        org: Option<String>,
        /// The token stops working after this long: `90m`, `12h`, `30d`,
        /// `3600s` or seconds (default: never).
        #[arg(long, value_name = "DURATION", conflicts_with_all = ["list", "revoke"])]
        expires: Option<String>,
        /// List the org's tokens (id, created, expiry; never the secret).
        #[arg(long, conflicts_with = "revoke")]
        list: bool,
        /// With --list: print JSON.
        #[arg(long, requires = "list")]
        json: bool,
        /// Revoke the token with this id (from --list): it stops working at once.
        #[arg(long, value_name = "ID")]
        revoke: Option<String>,
    },
}

/// `sixpn wireguard …`.
#[derive(Debug, Subcommand)]
pub enum WgCmd {
    /// Create a peer and write its wg-quick file.
    Create(CreateArgs),
    /// List an org's peers.
    List {
        /// The org.
        org: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a peer.
    Remove {
        /// The org.
        org: Option<String>,
        /// The peer.
        name: Option<String>,
    },
    /// Show a peer's tunnel state from its gateway.
    Status {
        /// The org.
        org: Option<String>,
        /// The peer.
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `sixpn wireguard create [ORG] [REGION] [NAME] [FILE]`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The org.
    pub org: Option<String>,
    /// The gateway region.
    pub region: Option<String>,
    /// The peer's name.
    pub name: Option<String>,
    /// Where to write the wg-quick file, or `stdout`.
    pub file: Option<String>,
    /// Register this existing public key instead of generating a key pair.
    #[arg(long)]
    pub public_key: Option<String>,
    /// Also print the configuration as a QR code (for the mobile apps).
    #[arg(long)]
    pub qr: bool,
    /// Make the peer ephemeral (for CI): it is removed once it has gone
    /// TTL (default 1h; e.g. 90m, 12h, 3600s; at most 30d) after its
    /// creation, or after its last activity, without a handshake or packet.
    #[arg(
        long,
        value_name = "TTL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1h"
    )]
    pub ephemeral: Option<String>,
}

/// `sixpn instances …`.
#[derive(Debug, Subcommand)]
pub enum InstancesCmd {
    /// Register an instance.
    Add {
        /// The org.
        org: String,
        /// The app.
        app: String,
        /// The region.
        region: String,
        /// Its 6PN address.
        #[arg(long, conflicts_with_all = ["host", "machine"], required_unless_present = "host")]
        address: Option<Ipv6Addr>,
        /// Host id (with --machine), e.g. a7b:7d.
        #[arg(long, requires = "machine")]
        host: Option<String>,
        /// Machine id (with --host), e.g. f066:b83b.
        #[arg(long, requires = "host")]
        machine: Option<String>,
        /// Instance id (default: the machine id as 8 hex digits).
        #[arg(long)]
        id: Option<String>,
        /// Process group.
        #[arg(long)]
        process_group: Option<String>,
        /// Register it as stopped.
        #[arg(long)]
        stopped: bool,
    },
    /// Remove an instance.
    Remove {
        /// The org.
        org: String,
        /// The app.
        app: String,
        /// The instance id.
        id: String,
    },
    /// List an org's instances.
    List {
        /// The org.
        org: String,
        /// Only this app.
        app: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

const KEY_WARNING: &str = "\
!!!! WARNING: Output includes private key. Private keys cannot be recovered !!!!
!!!! after creating the peer; if you lose the key, you’ll need to remove    !!!!
!!!! and re-add the peering connection.                                     !!!!";

/// Prompts for missing positional arguments, or says which one is missing.
struct Prompter {
    interactive: bool,
}

impl Prompter {
    fn new() -> Self {
        Self {
            interactive: std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
        }
    }

    fn text<T>(&self, given: Option<String>, arg: &'static str, prompt: &str) -> Result<T, CliError>
    where
        T: std::str::FromStr<Err = InvalidValue>,
    {
        if let Some(v) = given {
            return Ok(v.parse()?);
        }
        if !self.interactive {
            return Err(CliError::Missing(arg));
        }
        let v: String = dialoguer::Input::new()
            .with_prompt(prompt)
            .validate_with(|s: &String| s.parse::<T>().map(|_| ()).map_err(|e| e.to_string()))
            .interact_text()
            .map_err(|e| CliError::Prompt(e.to_string()))?;
        Ok(v.parse()?)
    }

    fn select<T>(
        &self,
        given: Option<String>,
        arg: &'static str,
        prompt: &str,
        choices: impl FnOnce() -> Result<Vec<T>, CliError>,
    ) -> Result<T, CliError>
    where
        T: std::str::FromStr<Err = InvalidValue> + std::fmt::Display + Clone,
    {
        if let Some(v) = given {
            return Ok(v.parse()?);
        }
        if !self.interactive {
            return Err(CliError::Missing(arg));
        }
        let items = choices()?;
        if items.is_empty() {
            return Err(CliError::Other(format!("no {arg} to choose from")));
        }
        let i = dialoguer::Select::new()
            .with_prompt(prompt)
            .items(&items)
            .default(0)
            .interact()
            .map_err(|e| CliError::Prompt(e.to_string()))?;
        Ok(items[i].clone())
    }
}

/// Runs one non-daemon command against the API.
pub async fn run(api: &str, command: Command) -> Result<(), CliError> {
    let token = std::env::var("SIXPN_TOKEN").ok();
    // HTTPS: the CA that signed the API's certificate, else the system's.
    let ca = std::env::var_os("SIXPN_CA").filter(|c| !c.is_empty());
    let client = Client::with_ca(api, token, ca.as_deref().map(std::path::Path::new))?;
    let p = Prompter::new();
    let rt = tokio::runtime::Handle::current();
    // Choice lists are fetched lazily, only when a prompt needs them.
    let org_choices = || -> Result<Vec<OrgName>, CliError> {
        let c = client.clone();
        let orgs = tokio::task::block_in_place(|| rt.block_on(c.orgs()))?;
        Ok(orgs.into_iter().map(|o| o.name).collect())
    };
    match command {
        Command::Gateway { .. } => Err(CliError::Other("gateway is not a client command".into())),
        Command::Doctor { config } => {
            let checks = crate::doctor::run(&config, api).await;
            if crate::doctor::print(&checks) {
                Ok(())
            } else {
                Err(CliError::Other("some checks failed (see above)".into()))
            }
        }
        Command::Orgs(OrgsCmd::Create { name }) => {
            let name: OrgName = p.text(name, "NAME", "Name of the new organization")?;
            let org = client.create_org(&name).await?;
            println!(
                "Created org {} with network {} (DNS {})",
                org.name, org.prefix, org.dns
            );
            Ok(())
        }
        Command::Orgs(OrgsCmd::List { json }) => {
            let orgs = client.orgs().await?;
            if json {
                return print_json(&orgs);
            }
            let rows = orgs
                .iter()
                .map(|o| vec![o.name.to_string(), o.prefix.to_string(), o.dns.to_string()])
                .collect();
            print_table(&["NAME", "PREFIX", "DNS"], rows);
            Ok(())
        }
        Command::Orgs(OrgsCmd::Token {
            org,
            expires,
            list,
            json,
            revoke,
        }) => {
            let org = p.select(org, "ORG", "Select organization", org_choices)?;
            if let Some(id) = revoke {
                let id: TokenId = id.parse()?;
                client.revoke_org_token(&org, &id).await?;
                eprintln!("revoked token {id} of org {org}");
                return Ok(());
            }
            if list {
                let tokens = client.org_tokens(&org).await?;
                if json {
                    return print_json(&tokens);
                }
                let rows = tokens
                    .iter()
                    .map(|t| {
                        let created = match t.created_at {
                            0 => "-".to_owned(),
                            c => utc(c),
                        };
                        let expires = match (t.expires_at, t.expired) {
                            (None, _) => "never".to_owned(),
                            (Some(e), true) => format!("{} (expired)", utc(e)),
                            (Some(e), false) => utc(e),
                        };
                        vec![t.id.to_string(), created, expires]
                    })
                    .collect();
                print_table(&["ID", "CREATED", "EXPIRES"], rows);
                return Ok(());
            }
            let expires_in = expires.as_deref().map(parse_duration).transpose()?;
            let t = client.create_org_token(&org, expires_in).await?;
            println!("{}", t.token);
            match t.expires_at {
                Some(e) => eprintln!("token {} of org {org}, expires {}", t.id, utc(e)),
                None => eprintln!("token {} of org {org}, never expires", t.id),
            }
            Ok(())
        }
        Command::Wireguard(WgCmd::Create(args)) => {
            wireguard_create(&client, &p, args, org_choices, &rt).await
        }
        Command::Wireguard(WgCmd::List { org, json }) => {
            let org = p.select(org, "ORG", "Select organization", org_choices)?;
            let peers = client.peers(&org).await?;
            if json {
                return print_json(&peers);
            }
            let rows = peers
                .iter()
                .map(|p| {
                    vec![
                        p.name.to_string(),
                        p.region.to_string(),
                        p.gateway.to_string(),
                        p.address.to_string(),
                        ephemeral_column(p),
                    ]
                })
                .collect();
            print_table(&["NAME", "REGION", "GATEWAY", "PEER IP", "EPHEMERAL"], rows);
            Ok(())
        }
        Command::Wireguard(WgCmd::Remove { org, name }) => {
            let org = p.select(org, "ORG", "Select organization", org_choices)?;
            let name = p.select(name, "NAME", "Select peer to remove", || {
                let c = client.clone();
                let peers = tokio::task::block_in_place(|| rt.block_on(c.peers(&org)))?;
                Ok(peers.into_iter().map(|p| p.name).collect::<Vec<PeerName>>())
            })?;
            client.remove_peer(&org, &name).await?;
            println!("Removed WireGuard peer \"{name}\" from organization {org}");
            Ok(())
        }
        Command::Wireguard(WgCmd::Status { org, name, json }) => {
            let org = p.select(org, "ORG", "Select organization", org_choices)?;
            let name = p.select(name, "NAME", "Select peer", || {
                let c = client.clone();
                let peers = tokio::task::block_in_place(|| rt.block_on(c.peers(&org)))?;
                Ok(peers.into_iter().map(|p| p.name).collect::<Vec<PeerName>>())
            })?;
            let s = client.peer_status(&org, &name).await?;
            if json {
                return print_json(&s);
            }
            print_status(&s);
            Ok(())
        }
        Command::Instances(cmd) => instances(&client, cmd).await,
    }
}

async fn wireguard_create(
    client: &Client,
    p: &Prompter,
    args: CreateArgs,
    org_choices: impl FnOnce() -> Result<Vec<OrgName>, CliError>,
    rt: &tokio::runtime::Handle,
) -> Result<(), CliError> {
    let org: OrgName = p.select(args.org, "ORG", "Select organization", org_choices)?;
    let region: RegionName = p.select(
        args.region,
        "REGION",
        "Region in which to add WireGuard peer",
        || {
            let c = client.clone();
            let regions = tokio::task::block_in_place(|| rt.block_on(c.regions()))?;
            Ok(regions.into_iter().map(|r| r.region).collect())
        },
    )?;
    let name: PeerName = p.text(args.name, "NAME", "Name of WireGuard peer to add")?;
    let ephemeral = args.ephemeral.as_deref().map(ephemeral_ttl).transpose()?;
    // Validate the key before anything is registered.
    let (private, public) = match args.public_key {
        Some(k) => (None, k.parse::<PublicKey>()?),
        None => {
            let k = PrivateKey::generate();
            let public = k.public_key();
            (Some(k), public)
        }
    };
    let file = match args.file {
        Some(f) => f,
        None if p.interactive => {
            p.text::<FileArg>(
                None,
                "FILE",
                "Filename to store WireGuard configuration in, or 'stdout'",
            )?
            .0
        }
        None => return Err(CliError::Missing("FILE")),
    };
    eprintln!("Creating WireGuard peer \"{name}\" in region \"{region}\" for organization {org}");
    // Claim the file before registering, so a file that exists fails the
    // command with nothing registered; remove our claim if the API says no.
    let mut out = if file == "stdout" {
        None
    } else {
        Some(create_exclusive(&file)?)
    };
    let created = client
        .create_peer(
            &org,
            &CreatePeer {
                region,
                name: name.clone(),
                public_key: public,
                ephemeral,
            },
        )
        .await;
    let peer = match created {
        Ok(peer) => peer,
        // The exchange broke after the request went out (the daemon died
        // mid-request?): it may or may not have registered the peer. Ask,
        // once it answers again, and go on with the file if it did.
        Err(ClientError::Protocol(why)) => match settle(client, &org, &name, &public).await {
            Settled::Registered(peer) => *peer,
            outcome => {
                if out.take().is_some() {
                    let _ = std::fs::remove_file(&file);
                }
                return Err(CliError::Other(outcome.message(&why, &org, &name)));
            }
        },
        Err(e) => {
            if out.take().is_some() {
                let _ = std::fs::remove_file(&file);
            }
            return Err(e.into());
        }
    };
    let text = wgquick::render(&peer, private.as_ref());
    if private.is_some() {
        eprintln!("{KEY_WARNING}");
    }
    let written = match out {
        None => {
            // Not print!: it panics when stdout can't take the text.
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("cannot write the configuration to stdout: {e}"))
        }
        Some(mut f) => f
            .write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("cannot write {file}: {e}")),
    };
    if let Err(e) = written {
        // Nothing half-done: without the file the key is lost, so the peer
        // must not stay registered.
        if file != "stdout" {
            let _ = std::fs::remove_file(&file);
        }
        let _ = client.remove_peer(&org, &peer.name).await;
        return Err(CliError::File(e));
    }
    // The file is written and the peer registered: what follows is news,
    // and a stdout that can't take it changes neither.
    if file != "stdout" {
        say(&format!(
            "Wrote WireGuard configuration to '{file}'; load in your WireGuard client"
        ));
    }
    if args.qr {
        // To stderr when the file itself went to stdout, so the two don't mix.
        let code = wgquick::qr(&text)?;
        if file == "stdout" {
            eprintln!("{code}");
        } else {
            say(&code);
        }
    }
    if peer.state == PeerState::Pending {
        eprintln!(
            "Note: gateway {} has not installed the peer yet; it will shortly",
            peer.gateway
        );
    }
    Ok(())
}

/// How long `wireguard create` waits for a daemon that went away
/// mid-request to answer again (systemd restarts it within seconds).
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// What became of a create whose answer was lost.
enum Settled {
    /// The peer is registered with our key: write its file.
    Registered(Box<crate::api::PeerInfo>),
    /// It is not (or the name is someone else's): nothing was registered.
    Absent,
    /// The API didn't answer in time, or refused to say.
    Unknown(String),
}

impl Settled {
    fn message(&self, why: &str, org: &OrgName, name: &PeerName) -> String {
        match self {
            Settled::Registered(_) => String::new(),
            Settled::Absent => format!(
                "the API's answer was lost ({why}) and peer {name} was not registered; \
                 nothing was written: run the command again"
            ),
            Settled::Unknown(e) => format!(
                "the API's answer was lost ({why}) and it can't say whether peer {name} was \
                 registered ({e}); no file was written: once `sixpn wireguard list {org}` \
                 answers, remove it with `sixpn wireguard remove {org} {name}` if it is there"
            ),
        }
    }
}

/// Finds out whether a create whose answer was lost registered the peer:
/// asks the API until it answers (at most [`SETTLE_WAIT`]).
async fn settle(client: &Client, org: &OrgName, name: &PeerName, key: &PublicKey) -> Settled {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    eprintln!("The API's answer was lost; asking whether peer \"{name}\" was registered…");
    loop {
        match client.peers(org).await {
            Ok(peers) => {
                return match peers.into_iter().find(|p| &p.name == name) {
                    Some(p) if &p.public_key == key => Settled::Registered(Box::new(p)),
                    _ => Settled::Absent,
                }
            }
            Err(ClientError::Connect { .. } | ClientError::Protocol(_))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Settled::Unknown(e.to_string()),
        }
    }
}

/// A line to stdout that may be lost (closed or full stdout) without a panic.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// A file name typed at the prompt (any non-empty string).
struct FileArg(String);
impl std::str::FromStr for FileArg {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        if s.trim().is_empty() {
            return Err(InvalidValue {
                kind: "file name",
                value: s.into(),
                reason: "must not be empty",
            });
        }
        Ok(Self(s.trim().to_owned()))
    }
}

/// Creates `path` exclusively with mode 0600: never overwrites, never
/// world-readable even for a moment.
fn create_exclusive(path: &str) -> Result<std::fs::File, CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                CliError::File(format!("{path} already exists; refusing to overwrite it"))
            }
            _ => CliError::File(format!("cannot create {path}: {e}")),
        })
}

async fn instances(client: &Client, cmd: InstancesCmd) -> Result<(), CliError> {
    match cmd {
        InstancesCmd::Add {
            org,
            app,
            region,
            address,
            host,
            machine,
            id,
            process_group,
            stopped,
        } => {
            let org: OrgName = org.parse()?;
            let req = AddInstance {
                app: app.parse::<AppName>()?,
                region: region.parse::<RegionName>()?,
                address,
                host: host.map(|h| h.parse::<HostId>()).transpose()?,
                machine: machine.map(|m| m.parse::<MachineId>()).transpose()?,
                id: id.map(|i| i.parse::<InstanceId>()).transpose()?,
                process_group: process_group
                    .map(|g| g.parse::<ProcessGroup>())
                    .transpose()?,
                started: !stopped,
            };
            let inst = client.add_instance(&org, &req).await?;
            println!(
                "Added instance {} of app {} in {} at {}",
                inst.id, inst.app, inst.region, inst.address
            );
            Ok(())
        }
        InstancesCmd::Remove { org, app, id } => {
            let org: OrgName = org.parse()?;
            let app: AppName = app.parse()?;
            let id: InstanceId = id.parse()?;
            client.remove_instance(&org, &app, &id).await?;
            println!("Removed instance {id} of app {app}");
            Ok(())
        }
        InstancesCmd::List { org, app, json } => {
            let org: OrgName = org.parse()?;
            let app: Option<AppName> = app.map(|a| a.parse()).transpose()?;
            let list = client.instances(&org, app.as_ref()).await?;
            if json {
                return print_json(&list);
            }
            let rows = list
                .iter()
                .map(|i| {
                    vec![
                        i.app.to_string(),
                        i.id.to_string(),
                        i.region.to_string(),
                        i.process_group
                            .as_ref()
                            .map_or_else(|| "-".into(), |g| g.to_string()),
                        if i.started { "started" } else { "stopped" }.into(),
                        i.address.to_string(),
                    ]
                })
                .collect();
            print_table(&["APP", "ID", "REGION", "GROUP", "STATE", "ADDRESS"], rows);
            Ok(())
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `90m`, `12h`, `30d`, `3600s` or plain seconds, as seconds.
fn parse_duration(s: &str) -> Result<u64, CliError> {
    crate::config::Seconds::parse(s)
        .map(|d| d.0)
        .ok_or_else(|| {
            CliError::Other(format!(
                "invalid duration {s:?}: use e.g. 90m, 12h, 30d or 3600s"
            ))
        })
}

/// `--ephemeral`'s TTL as seconds, within what the API takes.
fn ephemeral_ttl(s: &str) -> Result<u64, CliError> {
    let ttl = parse_duration(s)?;
    if ttl > crate::api::MAX_EPHEMERAL_TTL_SECS {
        return Err(CliError::Other(format!(
            "--ephemeral={s} is longer than 30d, the most an ephemeral peer may live idle"
        )));
    }
    Ok(ttl)
}

/// Seconds in the largest unit that divides them: `1h`, `90m`, `45s`.
fn fmt_ttl(secs: u64) -> String {
    match secs {
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `wireguard list`'s EPHEMERAL column: the TTL and the deadline if the
/// peer never connects, or `-` for a normal peer.
fn ephemeral_column(p: &crate::api::PeerInfo) -> String {
    match (p.ephemeral, p.expires_at) {
        (Some(ttl), Some(at)) => format!("{} (expires {})", fmt_ttl(ttl), utc(at)),
        (Some(ttl), None) => fmt_ttl(ttl),
        (None, _) => "-".to_owned(),
    }
}

/// Unix seconds as `2026-12-07 13:05 UTC`.
fn utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

fn ago(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(unix);
    match s {
        0..=119 => format!("{s} seconds ago"),
        120..=7199 => format!("{} minutes ago", s / 60),
        _ => format!("{} hours ago", s / 3600),
    }
}

fn print_status(s: &crate::api::PeerStatus) {
    let p = &s.peer;
    println!(
        "Peer {} ({}) on gateway {} in {}",
        p.name, p.address, p.gateway, p.region
    );
    println!("  state:            {:?}", p.state);
    println!(
        "  endpoint:         {}",
        s.endpoint.as_deref().unwrap_or("(none yet)")
    );
    println!(
        "  latest handshake: {}",
        s.latest_handshake.map_or_else(|| "never".into(), ago)
    );
    if let (Some(rx), Some(tx)) = (s.rx_bytes, s.tx_bytes) {
        println!("  transfer:         {rx} B received, {tx} B sent");
    }
    if let Some(t) = s.installed_since {
        match &s.installed_by {
            Some(by) => println!("  installed since:  {} (by {by})", ago(t)),
            None => println!("  installed since:  {}", ago(t)),
        }
    }
    if let Some(t) = s.evicted_at {
        println!("  evicted:          {} (idle)", ago(t));
    }
    if let (Some(ttl), Some(expires)) = (p.ephemeral, p.expires_at) {
        // A handshake is activity: it moves the deadline on.
        let expires = s
            .latest_handshake
            .map_or(expires, |h| expires.max(h.saturating_add(ttl)));
        println!(
            "  ephemeral:        {}, expires {} unless active",
            fmt_ttl(ttl),
            utc(expires)
        );
    }
    if let Some(n) = &s.note {
        println!("  note:             {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_ttls_default_to_an_hour_and_stay_within_30_days() {
        let ttl = |args: &[&str]| {
            let cli = Cli::try_parse_from(
                ["sixpn", "wireguard", "create"]
                    .iter()
                    .chain(args)
                    .chain(&["acme", "lhr", "ci", "stdout"]),
            )
            .unwrap();
            let Command::Wireguard(WgCmd::Create(a)) = cli.command else {
                panic!("not a create: {cli:?}");
            };
            assert_eq!(
                (a.org.as_deref(), a.file.as_deref()),
                (Some("acme"), Some("stdout"))
            );
            a.ephemeral.as_deref().map(ephemeral_ttl).transpose()
        };
        assert_eq!(ttl(&[]).unwrap(), None);
        assert_eq!(ttl(&["--ephemeral"]).unwrap(), Some(3_600));
        assert_eq!(ttl(&["--ephemeral=90m"]).unwrap(), Some(5_400));
        assert_eq!(ttl(&["--ephemeral=3600s"]).unwrap(), Some(3_600));
        assert_eq!(ttl(&["--ephemeral=30d"]).unwrap(), Some(2_592_000));
        assert!(ttl(&["--ephemeral=31d"]).is_err());
        assert!(ttl(&["--ephemeral=0"]).is_err());
        assert_eq!(fmt_ttl(3_600), "1h");
        assert_eq!(fmt_ttl(5_400), "90m");
        assert_eq!(fmt_ttl(45), "45s");
        assert_eq!(fmt_ttl(172_800), "2d");
    }

    #[test]
    fn durations_take_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("90m").unwrap(), 5_400);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        assert_eq!(parse_duration("30d").unwrap(), 2_592_000);
        assert_eq!(parse_duration("3600s").unwrap(), 3_600);
        assert_eq!(parse_duration("42").unwrap(), 42);
        for bad in [
            "",
            "0",
            "0d",
            "d",
            "1w",
            "-1h",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_796_643_900), "2026-12-07 11:45 UTC");
    }
}
