package kernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/explain"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/snat"
)

// TestPrivilegedReadSeesWhatTheDaemonWrote binds an address with pkg/netif,
// writes a SNAT rule with pkg/snat (nftables) and a steering rule and route
// as pkg/steer does, in a fresh namespace, and reads them back.
func TestPrivilegedReadSeesWhatTheDaemonWrote(t *testing.T) {
	privtest.Require(t, "nft")
	ns := privtest.NewNS(t, "evx-kernel")
	ns.Exec(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
	ns.Exec(t, "ip", "link", "set", "eth0p", "up")
	ns.Exec(t, "ip", "addr", "add", "198.51.100.11/24", "dev", "eth0")
	ns.Exec(t, "ip", "link", "set", "eth0", "up")
	ns.Exec(t, "ip", "route", "add", "default", "via", "198.51.100.12", "dev", "eth0", "onlink", "table", "59136", "proto", "231")
	ns.Exec(t, "ip", "rule", "add", "pref", "31000", "from", "10.244.1.5", "fwmark", "0x1000/0x1000", "lookup", "59136", "proto", "231")
	ns.Exec(t, "ip", "rule", "add", "pref", "31001", "from", "10.244.1.6", "lookup", "main") // not egressvip's
	log := logrus.New()
	log.SetOutput(io.Discard)
	entry := logrus.NewEntry(log)
	lb := netip.MustParseAddr("203.0.113.10")
	var got *explain.Local
	var err error
	ns.Do(t, func() {
		addrs, nerr := netif.New(netif.Config{Interface: "eth0", Log: entry})
		if nerr != nil {
			err = nerr
			return
		}
		if _, nerr := addrs.Sync(context.Background(), []model.Binding{{Addr: lb}}); nerr != nil {
			err = nerr
			return
		}
		fw, serr := snat.New(snat.Config{Backend: snat.BackendNFTables, Log: entry})
		if serr != nil {
			err = serr
			return
		}
		failed, aerr := fw.Apply(context.Background(), model.Datapath{SNAT: []model.SNATRule{{Service: "default/sip", Pod: netip.MustParseAddr("10.244.2.7"), Source: lb}}})
		if aerr != nil || len(failed) > 0 {
			err = errors.Join(aerr, fmt.Errorf("failed: %v", failed))
			return
		}
		got = Read(context.Background(), Config{Node: "node-a", Interface: "eth0", Log: entry, SNAT: snat.Config{Backend: snat.BackendNFTables}})
	})
	if err != nil {
		t.Fatal(err)
	}
	if got.HostError != "" || got.OwnedError != "" || got.FirewallError != "" || got.RulesError != "" {
		t.Fatalf("errors: %+v", got)
	}
	if got.Host == nil || !got.Host.Up || !slices.Contains(got.Host.Own, netip.MustParseAddr("198.51.100.11")) {
		t.Errorf("host %+v", got.Host)
	}
	if !slices.Equal(got.Owned, []netip.Addr{lb}) {
		t.Errorf("owned %v, want %v", got.Owned, lb)
	}
	if got.Backend != snat.BackendNFTables || !slices.Equal(got.FirewallServices, []string{"default/sip"}) {
		t.Errorf("firewall %s %v", got.Backend, got.FirewallServices)
	}
	want := explain.LocalRule{Priority: 31000, Src: netip.MustParsePrefix("10.244.1.5/32"), Mark: 0x1000, Mask: 0x1000, Table: 59136,
		Routes: []string{"default via 198.51.100.12 dev eth0 onlink"}}
	if len(got.Rules) != 1 || fmt.Sprint(got.Rules[0]) != fmt.Sprint(want) {
		t.Errorf("rules %+v, want %+v", got.Rules, want)
	}
}

func TestReadReportsAnUnknownInterface(t *testing.T) {
	got := Read(context.Background(), Config{Node: "node-a", InterfaceErr: errors.New("no default route"),
		SNAT: snat.Config{Backend: "no-such-backend"}})
	if got.HostError != "no default route" || got.OwnedError != "no default route" || got.FirewallError == "" {
		t.Errorf("%+v", got)
	}
}
