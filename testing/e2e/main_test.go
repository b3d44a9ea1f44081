//go:build e2e

// Package e2e runs egressvip's end-to-end scenarios on the sandbox cluster:
// a real kube-apiserver and kube-controller-manager, nodes and pods as
// network namespaces, real packets checked at an external host.
package e2e

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egressvip/egressvip/testing/sandbox"
)

var (
	cluster *sandbox.Cluster

	figuresMu sync.Mutex
	figures   = map[string]string{}
)

// record keeps a measured figure for the summary printed at the end.
func record(name, value string) {
	figuresMu.Lock()
	defer figuresMu.Unlock()
	figures[name] = value
}

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		if os.Getenv("EGRESSVIP_REQUIRE_PRIVILEGED") == "1" {
			fmt.Println("e2e: needs root (EGRESSVIP_REQUIRE_PRIVILEGED=1)")
			os.Exit(1)
		}
		fmt.Println("e2e: skipping, needs root")
		os.Exit(0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	var err error
	cluster, err = sandbox.Start(ctx, sandbox.Options{
		Nodes:     3,
		Logf:      func(f string, a ...any) { fmt.Printf("sandbox: "+f+"\n", a...) },
		DaemonEnv: map[string]string{"log_level": "debug"},
	})
	cancel()
	if err != nil {
		fmt.Println("sandbox:", err)
		if cluster != nil {
			cluster.Stop()
		}
		os.Exit(1)
	}
	code := m.Run()
	if code != 0 {
		fmt.Println("e2e: failed; logs kept in", cluster.Dir)
	}
	cluster.Stop()
	if code == 0 {
		_ = os.RemoveAll(cluster.Dir)
	}
	figuresMu.Lock()
	var names []string
	for k := range figures {
		names = append(names, k)
	}
	sort.Strings(names)
	fmt.Println(strings.Repeat("=", 60))
	fmt.Println("e2e figures:")
	for _, k := range names {
		fmt.Printf("  %-45s %s\n", k, figures[k])
	}
	figuresMu.Unlock()
	os.Exit(code)
}
