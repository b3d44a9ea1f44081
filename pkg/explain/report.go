// Package explain answers "why does my pod leave with this address (or
// not)" for one Service: `egressvip explain <namespace>/<service>`.
//
// Build is pure: from the objects read from the API server (Objects), the
// daemon's settings and, when run on a node, what that node's kernel holds
// (Local), it makes a Report. It decides nothing of its own: it runs the
// daemon's analysis (desired.Analyze, desired.Admit) and planner
// (plan.Explain) once per node, each from that node's view, on an election
// view rebuilt from listed Leases (election.OfflineView), and reports what
// they say. Fetch is the thin reader of the API server; the kernel is read
// by pkg/explain/kernel. Render and JSON print a Report; MaskVolatile
// blanks what changes from run to run, for golden tests.
package explain

import "time"

// Report is what `egressvip explain` prints, for people (Render) and, as
// JSON, for scripts. Lists are sorted; every field that changes from run to
// run on an unchanged cluster (Time, ages, routing table numbers) is
// blanked by MaskVolatile.
type Report struct {
	// Time is when the API server was read (volatile).
	Time time.Time `json:"time,omitzero"`
	// Observer is the node explain ran on ("" off the nodes): Kernel is
	// its kernel.
	Observer string `json:"observer,omitempty"`
	// Settings are the daemon settings the answer depends on.
	Settings Settings `json:"settings"`
	Service  Service  `json:"service"`
	// Leases are the Service's address Leases (one per address, in the
	// daemon's namespace) and its Service Lease.
	Leases []Lease `json:"leases"`
	// Nodes are every node known from heartbeats, Node objects or
	// endpoints, by name.
	Nodes []Node `json:"nodes"`
	// Endpoints are the Service's pods, by name.
	Endpoints []Endpoint `json:"endpoints"`
	// Kernel is what the observer's kernel holds for the Service (nil off
	// the nodes).
	Kernel *Kernel `json:"kernel,omitempty"`
}

// Settings are the daemon settings shown in a Report.
type Settings struct {
	DaemonNamespace string `json:"daemonNamespace"`
	// LeaseDurationSeconds and RenewDeadlineSeconds are the lease timing
	// (vip_leaseduration, vip_renewdeadline).
	LeaseDurationSeconds float64 `json:"leaseDurationSeconds"`
	RenewDeadlineSeconds float64 `json:"renewDeadlineSeconds"`
	// ServiceElection is svc_election: false elects one node for all.
	ServiceElection bool `json:"serviceElection"`
	// PodCIDRs and ServiceCIDRs are the ranges in use, with where they
	// came from (pkg/cidr).
	PodCIDRs      []string `json:"podCIDRs"`
	PodSource     string   `json:"podCIDRSource"`
	ServiceCIDRs  []string `json:"serviceCIDRs"`
	ServiceSource string   `json:"serviceCIDRSource"`
}

// Service is the Service and what egressvip makes of it.
type Service struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Found is false when no such Service exists.
	Found bool `json:"found"`
	// Ignored says why egressvip does not serve it at all ("" when it
	// does): not of type LoadBalancer, another class, another namespace
	// than svc_namespace, kube-vip.io/ignore.
	Ignored string `json:"ignored,omitempty"`
	// TrafficPolicy is externalTrafficPolicy: Local or Cluster.
	TrafficPolicy string `json:"trafficPolicy"`
	// Addresses are its LoadBalancer IPs, IPv4 first, each admitted or
	// refused with why.
	Addresses []Address `json:"addresses"`
	Egress    Egress    `json:"egress"`
	// Invalid says why nothing is programmed for it ("" when it is
	// valid): desired.ReasonInvalid, ReasonNoAddress, ReasonRefused.
	Invalid string `json:"invalid,omitempty"`
	// Group are the Services elected with it (they share an address), by
	// namespace/name, itself included.
	Group []string `json:"group,omitempty"`
	// ReadyNodes are the nodes with a ready (or serving terminating)
	// endpoint: with traffic policy Local the only nodes that may hold it.
	ReadyNodes []string `json:"readyNodes"`
	// Eligible are the nodes that may hold it now, in rank order: the
	// first takes a free address at once, the others a retry period per
	// place later.
	Eligible []string `json:"eligible"`
	// Holder is the node whose holding decides ("" when none is valid);
	// Decision is the holder's reason (plan.Reason*), or the first
	// eligible node's when nobody holds it.
	Holder   string `json:"holder,omitempty"`
	Decision string `json:"decision,omitempty"`
	// ReportedBy is the node that raises the Service's Events.
	ReportedBy string `json:"reportedBy,omitempty"`
	// Problems are the Warning Events that node raises (transient ones
	// only once they last).
	Problems []Problem `json:"problems"`
	// Status is what the holder wrote on the Service.
	Status Status `json:"status"`
}

// Address is one LoadBalancer IP of the Service.
type Address struct {
	IP     string `json:"ip"`
	Family string `json:"family"`
	// Admitted is false when desired.Admit refused it; Refused says why
	// (LoadBalancerIPRefused, LoadBalancerIPConflict).
	Admitted bool     `json:"admitted"`
	Refused  *Problem `json:"refused,omitempty"`
}

// Egress is the Service's egress configuration as the daemon read it.
type Egress struct {
	Enabled bool `json:"enabled"`
	// Families are IPv4, IPv6 or both.
	Families []string `json:"families,omitempty"`
	// Ports, Allow and Deny are the destination filter.
	Ports          []string `json:"ports,omitempty"`
	Allow          []string `json:"allow,omitempty"`
	Deny           []string `json:"deny,omitempty"`
	Strict         bool     `json:"strict"`
	FlushConntrack bool     `json:"flushConntrack"`
}

// Problem is one Warning Event.
type Problem struct {
	Reason  string `json:"reason"`
	Message string `json:"message"`
	// Fatal: nothing is programmed for the Service. Transient: raised
	// only once it has lasted 5 s.
	Fatal     bool `json:"fatal,omitempty"`
	Transient bool `json:"transient,omitempty"`
}

// Status is what the holder reported on the Service.
type Status struct {
	Ingress            []string `json:"ingress,omitempty"`
	VIPHost            string   `json:"vipHost,omitempty"`
	ActiveEndpoint     string   `json:"activeEndpoint,omitempty"`
	ActiveEndpointIPv6 string   `json:"activeEndpointIPv6,omitempty"`
}

// Lease is one ownership Lease of the Service.
type Lease struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Kind is address or service; Address the address an address Lease
	// elects.
	Kind    string `json:"kind"`
	Address string `json:"address,omitempty"`
	// Exists is false when the Lease was not found.
	Exists bool `json:"exists"`
	// Holder is the node it names ("" when released).
	Holder string `json:"holder,omitempty"`
	// Writer is the release the holder runs: current, heartbeat (the
	// release before address Leases) or legacy (before heartbeats).
	Writer string `json:"writer,omitempty"`
	// Valid: the holding counts (the holder's heartbeat is live, or a
	// legacy holding was renewed within its duration).
	Valid bool `json:"valid"`
	// ClaimedBy is the namespace an address Lease records.
	ClaimedBy string `json:"claimedBy,omitempty"`
	// HeartbeatAgeSeconds is now - renewTime of the holder's heartbeat
	// (of the Lease itself for a legacy holder), rounded to 0.1 s; nil when
	// there is none (or masked). LeaseDurationSeconds is what it is
	// compared with.
	HeartbeatAgeSeconds  *float64 `json:"heartbeatAgeSeconds,omitempty"`
	LeaseDurationSeconds float64  `json:"leaseDurationSeconds,omitempty"`
}

// Node is one node and what it makes of the Service.
type Node struct {
	Name string `json:"name"`
	// NodeObject: a Node of that name exists. Heartbeat: its egressvip
	// heartbeat Lease exists.
	NodeObject bool `json:"nodeObject"`
	Heartbeat  bool `json:"heartbeat"`
	// Live: its heartbeat is valid (renewTime + lease duration is later
	// than now).
	Live                 bool     `json:"live"`
	HeartbeatAgeSeconds  *float64 `json:"heartbeatAgeSeconds,omitempty"`
	LeaseDurationSeconds float64  `json:"leaseDurationSeconds,omitempty"`
	// Version is the election protocol it runs (election.ProtocolVersion
	// for this release). Standing: its serviceInterface is usable.
	// Draining: it is shutting down.
	Version  int  `json:"version"`
	Standing bool `json:"standing"`
	Draining bool `json:"draining,omitempty"`
	// Eligible: it may hold the Service's group now; Rank is its place
	// (1 first, 0 when not eligible); WhyNot why it is not.
	Eligible bool   `json:"eligible"`
	Rank     int    `json:"rank"`
	WhyNot   string `json:"whyNot,omitempty"`
	// Decision is its planner's reason for the group (plan.Reason*), and
	// Holder the holder it sees.
	Decision string `json:"decision,omitempty"`
	Holder   string `json:"holder,omitempty"`
	// Via are its next hops for steered traffic (from its heartbeat).
	Via []string `json:"via,omitempty"`
}

// Endpoint is one pod of the Service.
type Endpoint struct {
	Name string `json:"name"`
	// Namespace and Kind are the slice's targetRef.
	Namespace string `json:"namespace,omitempty"`
	Kind      string `json:"kind,omitempty"`
	Node      string `json:"node,omitempty"`
	IPv4      string `json:"ipv4,omitempty"`
	IPv6      string `json:"ipv6,omitempty"`
	// Ready, Serving, Terminating are its EndpointSlice conditions (a pod
	// that is only in its node's pod list yet is none of them).
	Ready       bool `json:"ready"`
	Serving     bool `json:"serving"`
	Terminating bool `json:"terminating"`
	// Trusted: its node's daemon lends it the Service's address; Skipped
	// says why not (EndpointNotEgressed).
	Trusted bool   `json:"trusted"`
	Skipped string `json:"skipped,omitempty"`
	// Egress is its path out, per family the Service egresses.
	Egress []Path `json:"egress,omitempty"`
}

// Path modes.
const (
	// PathSNAT: the pod is on the holder and leaves with the address.
	PathSNAT = "snat"
	// PathSteered: the pod's node routes its traffic to the holder, which
	// SNATs it to the address.
	PathSteered = "steered"
	// PathHeld: its off-cluster traffic is dropped (a strict Service with
	// no path to its address, or a steered pod the holder has not
	// confirmed).
	PathHeld = "held"
	// PathNone: it leaves with its node's address, as without egressvip.
	PathNone = "none"
)

// Path is how one address of a pod leaves the cluster.
type Path struct {
	Family string `json:"family"`
	Pod    string `json:"pod"`
	Mode   string `json:"mode"`
	// Source is the Service's address it leaves with (snat, steered).
	Source string `json:"source,omitempty"`
	// Holder is the node that SNATs it; Via the next hops its node
	// routes it to (steered), Tunnel when through the VXLAN device.
	Holder string   `json:"holder,omitempty"`
	Via    []string `json:"via,omitempty"`
	Tunnel bool     `json:"tunnel,omitempty"`
	// Why explains held and none.
	Why string `json:"why,omitempty"`
}

// Kernel is what the observer's kernel holds for the Service, next to
// what its planner wants.
type Kernel struct {
	Node      string `json:"node"`
	Interface string `json:"interface,omitempty"`
	// InterfaceError is why the serviceInterface could not be read (its
	// own addresses, subnets and gateways refuse LoadBalancer IPs).
	InterfaceError string `json:"interfaceError,omitempty"`
	// Addresses are the Service's addresses: Bound on the serviceInterface
	// by egressvip, Want by this node's plan.
	Addresses      []KernelAddress `json:"addresses"`
	AddressesError string          `json:"addressesError,omitempty"`
	// Firewall: whether the firewall has rules for the Service.
	Firewall KernelFirewall `json:"firewall"`
	// Steering are the routing rules for the Service's pods on this node.
	Steering      []KernelSteer `json:"steering"`
	SteeringError string        `json:"steeringError,omitempty"`
}

// KernelAddress is one address on the serviceInterface.
type KernelAddress struct {
	IP    string `json:"ip"`
	Bound bool   `json:"bound"`
	Want  bool   `json:"want"`
}

// KernelFirewall is the firewall's state for the Service.
type KernelFirewall struct {
	Backend string `json:"backend,omitempty"`
	// Rules: SNAT, steering-mark or hold rules commented with the
	// Service exist (either family). Want: this node's plan has some.
	Rules bool   `json:"rules"`
	Want  bool   `json:"want"`
	Error string `json:"error,omitempty"`
}

// KernelSteer is the steering of one pod address of this node.
type KernelSteer struct {
	Pod string `json:"pod"`
	// Want: this node's plan steers it (to Holder).
	Want   bool   `json:"want"`
	Holder string `json:"holder,omitempty"`
	// Rules are egressvip's ip rules from the pod's address; Routes the
	// routes of the tables they look up.
	Rules  []KernelRule `json:"rules"`
	Routes []string     `json:"routes,omitempty"`
}

// KernelRule is one ip rule with egressvip's protocol.
type KernelRule struct {
	Priority int    `json:"priority"`
	From     string `json:"from"`
	Mark     uint32 `json:"mark"`
	Mask     uint32 `json:"mask"`
	// Table is the routing table it looks up (volatile: allocated in
	// order of use).
	Table int `json:"table"`
}
