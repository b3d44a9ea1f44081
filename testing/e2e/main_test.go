//go:build e2e

// Package e2e runs egressvip's end-to-end scenarios on the sandbox cluster:
// a real kube-apiserver and kube-controller-manager, nodes and pods as
// network namespaces, real packets checked at an external host.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/egressvip/egressvip/testing/sandbox"
)

var (
	cluster *sandbox.Cluster

	figuresMu sync.Mutex
	figures   = map[string]string{}
)

// Figures the summary line names.
const (
	figConvergence = "scenario 5: move convergence"
	figGap         = "scenario 6: longest gap across SIGKILL and SIGTERM restarts"
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
	// Ctrl-C or SIGTERM: cancel a start in progress, tear down, exit. A
	// run killed harder leaves namespaces the next run removes first.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Printf("e2e: %s, tearing the sandbox down\n", s)
		cancel()
		sandbox.StopRunning()
		os.Exit(130)
	}()
	var err error
	cluster, err = sandbox.Start(ctx, sandbox.Options{
		Nodes:     3,
		Logf:      func(f string, a ...any) { fmt.Printf("sandbox: "+f+"\n", a...) },
		DaemonEnv: map[string]string{"log_level": "debug", "egressvip_allocator": "true"},
		// Service Leases are owned by their Service: the garbage
		// collector removes them with it.
		Controllers: []string{"garbagecollector"},
	})
	cancel()
	if err != nil {
		fmt.Println("sandbox:", err)
		if cluster != nil {
			fmt.Println("e2e: logs kept in", cluster.Dir)
		}
		os.Exit(1)
	}
	code := m.Run()
	if code != 0 {
		fmt.Println("e2e: failed; logs (control plane and egressvip per node) kept in", cluster.Dir)
	}
	cluster.Stop()
	switch {
	case code == 0 && os.Getenv("EGRESSVIP_E2E_KEEP_LOGS") == "1":
		fmt.Println("e2e: logs kept in", cluster.Dir, "(EGRESSVIP_E2E_KEEP_LOGS=1)")
	case code == 0:
		_ = os.RemoveAll(cluster.Dir)
	}
	printFigures()
	os.Exit(code)
}

func printFigures() {
	figuresMu.Lock()
	defer figuresMu.Unlock()
	var names []string
	for k := range figures {
		names = append(names, k)
	}
	sort.Strings(names)
	fmt.Println(strings.Repeat("=", 72))
	fmt.Println("e2e figures:")
	for _, k := range names {
		fmt.Printf("  %-48s %s\n", k, figures[k])
	}
	get := func(k string) string {
		if v, ok := figures[k]; ok {
			return v
		}
		return "not measured"
	}
	fmt.Printf("E2E SUMMARY: move convergence (new pod Ready -> first packet with the LB IP) %s; longest gap across daemon SIGKILL and SIGTERM restarts (10 ms flow) %s\n",
		get(figConvergence), get(figGap))
}
