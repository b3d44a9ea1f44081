package election

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

var fast = Timing{LeaseDuration: 1200 * time.Millisecond, RenewDeadline: 800 * time.Millisecond, RetryPeriod: 100 * time.Millisecond}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// eventually polls cond for at most 10 s; it is a bound, not a timing assertion.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestTimingValidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timing  Timing
		wantErr bool
	}{
		{name: "defaults", timing: Timing{5 * time.Second, 3 * time.Second, time.Second}},
		{name: "duration not above deadline", timing: Timing{3 * time.Second, 3 * time.Second, time.Second}, wantErr: true},
		{name: "deadline not above 1.2 retry", timing: Timing{5 * time.Second, 1200 * time.Millisecond, time.Second}, wantErr: true},
		{name: "zero retry", timing: Timing{5 * time.Second, 3 * time.Second, 0}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.timing.Validate(); (err != nil) != tc.wantErr {
				t.Fatalf("Validate() = %v, wantErr %v", err, tc.wantErr)
			}
		})
	}
}

func TestOneLeaderAndHandover(t *testing.T) {
	client := fake.NewClientset()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lease := types.NamespacedName{Namespace: "default", Name: LeaseName("web")}
	a := NewManager(client, "node-a", fast, nil, quietLog())
	b := NewManager(client, "node-b", fast, nil, quietLog())

	a.Stand(ctx, lease)
	eventually(t, "node-a leads", func() bool { return a.State(lease).Leading })
	b.Stand(ctx, lease)
	eventually(t, "node-b observes node-a", func() bool { return b.State(lease).Holder == "node-a" })
	if b.State(lease).Leading {
		t.Fatal("node-b leads while node-a holds the lease")
	}

	// Withdrawing releases the lease at once, so node-b takes over well
	// before the lease duration would have expired.
	a.Withdraw(lease)
	got, err := client.CoordinationV1().Leases("default").Get(ctx, lease.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := got.Spec.HolderIdentity; h != nil && *h == "node-a" {
		t.Fatalf("lease still held by node-a after Withdraw")
	}
	eventually(t, "node-b leads", func() bool { return b.State(lease).Leading })
	if st := a.State(lease); st.Standing || st.Leading {
		t.Fatalf("withdrawn elector still reports %+v", st)
	}
}

func TestSameIdentityResumesHeldLease(t *testing.T) {
	client := fake.NewClientset()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lease := types.NamespacedName{Namespace: "default", Name: LeaseName("sip")}

	first := NewManager(client, "node-a", fast, nil, quietLog())
	first.Stand(ctx, lease)
	eventually(t, "first process leads", func() bool { return first.State(lease).Leading })
	first.Abandon(lease)

	// A restarted daemon on the same node finds its own identity in the
	// Lease and leads again without waiting for the Lease to expire.
	pokes := make(chan struct{}, 10)
	second := NewManager(client, "node-a", fast, func() {
		select {
		case pokes <- struct{}{}:
		default:
		}
	}, quietLog())
	second.Stand(ctx, lease)
	eventually(t, "second process leads", func() bool { return second.State(lease).Leading })
	select {
	case <-pokes:
	default:
		t.Fatal("state change did not poke the sync loop")
	}
}

// An API server that stops answering: the elector says the renewal is
// overdue a renew deadline after the last renewal, while client-go still
// reports leading (it gives up only after also failing to release), and
// the loss follows.
func TestRenewalOverdueComesBeforeTheLoss(t *testing.T) {
	client := fake.NewClientset()
	var hang atomic.Bool
	unblock := make(chan struct{})
	client.PrependReactor("*", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		if !hang.Load() {
			return false, nil, nil
		}
		// A request to an API server that does not answer hangs.
		select {
		case <-unblock:
		case <-time.After(time.Second):
		}
		return true, nil, errors.New("API server unreachable")
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	defer close(unblock)
	lease := types.NamespacedName{Namespace: "default", Name: LeaseName("web")}
	m := NewManager(client, "node-a", fast, nil, quietLog())
	m.Stand(ctx, lease)
	eventually(t, "node-a leads", func() bool { return m.State(lease).Leading })

	// Renewals that succeed keep it from ever being overdue.
	for end := time.Now().Add(3 * fast.RenewDeadline); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if st := m.State(lease); st.Overdue || !st.Leading {
			t.Fatalf("with a working API server: %+v", st)
		}
	}

	hang.Store(true)
	eventually(t, "renewal overdue while client-go still reports leading", func() bool {
		st := m.State(lease)
		return st.Leading && st.Overdue
	})
	eventually(t, "client-go gives the lease up", func() bool {
		st := m.State(lease)
		return !st.Leading && !st.Overdue && !st.LostAt.IsZero()
	})
}
