// Package election runs one client-go leader election per Service on a
// coordination.k8s.io Lease. Callbacks only record state and poke the sync
// loop; nothing here touches the kernel. The leaderelection package has no
// fencing, so whatever acts on Leading must be idempotent and tolerate a
// short double ownership.
package election

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// LeasePrefix starts the name of every Lease egressvip uses:
// egressvip-<service name>, in the Service's namespace.
const LeasePrefix = "egressvip-"

// LeaseName is the Lease that elects the node serving a Service.
func LeaseName(service string) string { return LeasePrefix + service }

// Timing is the lease timing; Validate it before use.
type Timing struct {
	LeaseDuration time.Duration
	RenewDeadline time.Duration
	RetryPeriod   time.Duration
}

// Validate applies client-go's rule LeaseDuration > RenewDeadline > 1.2*RetryPeriod.
func (t Timing) Validate() error {
	if t.RetryPeriod <= 0 {
		return fmt.Errorf("retry period must be positive, got %s", t.RetryPeriod)
	}
	if t.LeaseDuration <= t.RenewDeadline {
		return fmt.Errorf("lease duration (%s) must be greater than renew deadline (%s)", t.LeaseDuration, t.RenewDeadline)
	}
	if float64(t.RenewDeadline) <= 1.2*float64(t.RetryPeriod) {
		return fmt.Errorf("renew deadline (%s) must be greater than 1.2 x retry period (%s)", t.RenewDeadline, t.RetryPeriod)
	}
	return nil
}

// State is what one elector knows about its Lease.
type State struct {
	// Standing is true while this node is a candidate.
	Standing bool
	// Leading is true while this node holds the Lease.
	Leading bool
	// Observed is true once the elector has read the Lease at least once,
	// so Holder is meaningful.
	Observed bool
	// Holder is the last identity seen holding the Lease ("" if none).
	Holder string
	// LostAt is when this node last stopped leading without withdrawing
	// (a failed renewal); zero otherwise.
	LostAt time.Time
	// Overdue is true while this node still leads but its last successful
	// renewal is older than the renew deadline. client-go reports the loss
	// only after it has also tried to release the Lease, up to another
	// renew deadline later, by when the Lease may have expired and another
	// node taken it; Overdue comes in time to give the address up first.
	Overdue bool
}

// Manager runs the electors of one node.
type Manager struct {
	client   kubernetes.Interface
	identity string
	timing   Timing
	poke     func()
	log      *logrus.Entry

	mu       sync.Mutex
	electors map[types.NamespacedName]*elector
}

type elector struct {
	cancel context.CancelFunc
	done   chan struct{}
	state  State
	// renewedAt is the RenewTime of this node's last successful write of
	// the Lease; overdue fires a renew deadline after it. Both are guarded
	// by Manager.mu.
	renewedAt time.Time
	overdue   *time.Timer
}

// NewManager returns a Manager whose electors identify as identity and call
// poke whenever their state changes.
func NewManager(client kubernetes.Interface, identity string, timing Timing, poke func(), log *logrus.Entry) *Manager {
	return &Manager{
		client:   client,
		identity: identity,
		timing:   timing,
		poke:     poke,
		log:      log,
		electors: map[types.NamespacedName]*elector{},
	}
}

// Identity is the holder identity this node writes into Leases.
func (m *Manager) Identity() string { return m.identity }

// State returns the state of the elector for lease (zero if none runs).
func (m *Manager) State(lease types.NamespacedName) State {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e, ok := m.electors[lease]; ok {
		return e.state
	}
	return State{}
}

// Leases lists the leases this node currently stands for.
func (m *Manager) Leases() []types.NamespacedName {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]types.NamespacedName, 0, len(m.electors))
	for k := range m.electors {
		out = append(out, k)
	}
	return out
}

// Stand makes this node a candidate for lease; it is a no-op if it already is.
func (m *Manager) Stand(ctx context.Context, lease types.NamespacedName) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.electors[lease]; ok {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	e := &elector{cancel: cancel, done: make(chan struct{}), state: State{Standing: true}}
	m.electors[lease] = e
	go func() {
		defer close(e.done)
		m.run(ctx, lease, e)
		m.mu.Lock()
		if e.overdue != nil {
			e.overdue.Stop()
		}
		m.mu.Unlock()
	}()
}

// Withdraw stops standing for lease and releases it if held, waiting at most
// the renew deadline for the release to be written.
func (m *Manager) Withdraw(lease types.NamespacedName) {
	m.mu.Lock()
	e, ok := m.electors[lease]
	delete(m.electors, lease)
	m.mu.Unlock()
	if !ok {
		return
	}
	e.cancel()
	select {
	case <-e.done:
	case <-time.After(m.timing.RenewDeadline + time.Second):
		m.log.WithField("lease", lease.String()).Warn("lease release did not finish in time")
	}
}

// Abandon forgets the elector for lease without cancelling it, so the Lease
// is neither released nor left to lapse before the process exits: a
// restarted daemon with the same identity takes it over without a gap. It is
// used on shutdown, for Services no other node could serve.
func (m *Manager) Abandon(lease types.NamespacedName) {
	m.mu.Lock()
	delete(m.electors, lease)
	m.mu.Unlock()
}

// renewed records a successful write of this node's own Lease record with
// RenewTime at, and arms the overdue timer a renew deadline after it.
func (m *Manager) renewed(e *elector, at time.Time) {
	m.update(e, func(s *State) {
		e.renewedAt = at
		s.Overdue = false
		wait := m.timing.RenewDeadline - time.Since(at)
		if e.overdue == nil {
			e.overdue = time.AfterFunc(wait, func() { m.checkOverdue(e) })
		} else {
			e.overdue.Reset(wait)
		}
	})
}

// checkOverdue runs when the overdue timer fires. A renewal may have
// landed just before, so it compares the times again under the lock.
func (m *Manager) checkOverdue(e *elector) {
	m.update(e, func(s *State) {
		s.Overdue = s.Leading && time.Since(e.renewedAt) >= m.timing.RenewDeadline
	})
}

// update changes e's state under the lock and pokes the sync loop if it
// changed.
func (m *Manager) update(e *elector, f func(*State)) {
	m.mu.Lock()
	before := e.state
	f(&e.state)
	changed := before != e.state
	m.mu.Unlock()
	if changed && m.poke != nil {
		m.poke()
	}
}

// run keeps one elector standing until ctx ends. A failed renewal makes
// client-go's Run return; the node then stands again at once.
func (m *Manager) run(ctx context.Context, lease types.NamespacedName, e *elector) {
	log := m.log.WithField("lease", lease.String())
	for ctx.Err() == nil {
		lock := renewWatch{
			Interface: &resourcelock.LeaseLock{
				LeaseMeta:  metaFor(lease),
				Client:     m.client.CoordinationV1(),
				LockConfig: resourcelock.ResourceLockConfig{Identity: m.identity},
			},
			renewed: func(at time.Time) { m.renewed(e, at) },
		}
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   m.timing.LeaseDuration,
			RenewDeadline:   m.timing.RenewDeadline,
			RetryPeriod:     m.timing.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            lease.String(),
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(leadCtx context.Context) {
					m.update(e, func(s *State) {
						// The leading context is cancelled before
						// OnStoppedLeading runs, so a late start
						// cannot overwrite a stop.
						if leadCtx.Err() == nil {
							s.Leading = true
							s.Holder = m.identity
							s.Observed = true
							s.LostAt = time.Time{}
						}
					})
					log.Info("started leading")
				},
				OnStoppedLeading: func() {
					m.update(e, func(s *State) {
						if s.Leading && ctx.Err() == nil {
							s.LostAt = time.Now()
						}
						s.Leading = false
						s.Overdue = false
					})
				},
				OnNewLeader: func(identity string) {
					m.update(e, func(s *State) {
						s.Observed = true
						s.Holder = identity
						if identity != m.identity {
							s.LostAt = time.Time{}
						}
					})
					if identity != m.identity {
						log.WithField("holder", identity).Debug("lease held by another node")
					}
				},
			},
		})
		if err != nil {
			log.WithError(err).Error("cannot create leader elector")
			return
		}
		le.Run(ctx)
		if ctx.Err() == nil {
			log.Warn("stopped leading; standing again")
			// Run returns at once only when renewal failed; a short
			// pause keeps a broken API server from being hammered.
			select {
			case <-ctx.Done():
			case <-time.After(m.timing.RetryPeriod):
			}
		}
	}
}

// renewWatch is the Lease lock with a hook on every successful write of
// this node's own record (an acquisition or a renewal): client-go does not
// say when a renewal last succeeded, and the datapath has to stop before
// the Lease can expire.
type renewWatch struct {
	resourcelock.Interface
	renewed func(at time.Time)
}

func (l renewWatch) Create(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	err := l.Interface.Create(ctx, r)
	l.observe(r, err)
	return err
}

func (l renewWatch) Update(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	err := l.Interface.Update(ctx, r)
	l.observe(r, err)
	return err
}

// observe reports a successful write of our own record. Its RenewTime was
// taken before the request, so the Lease cannot expire earlier than
// RenewTime plus the lease duration. A release (an empty holder) is not a
// renewal.
func (l renewWatch) observe(r resourcelock.LeaderElectionRecord, err error) {
	if err == nil && r.HolderIdentity == l.Identity() {
		l.renewed(r.RenewTime.Time)
	}
}
