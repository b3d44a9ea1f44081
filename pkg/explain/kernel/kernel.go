// Package kernel reads, for `egressvip explain` run on a node, what the
// node's kernel holds: egressvip's addresses on the serviceInterface
// (pkg/netif), the Services its firewall has rules for (pkg/snat) and its
// steering rules (ip rules with protocol 231, and the routes of the tables
// they look up). It only reads; nothing is written.
package kernel

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"

	"github.com/egressvip/egressvip/pkg/explain"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/snat"
	"github.com/egressvip/egressvip/pkg/steer"
)

// Config says what to read.
type Config struct {
	// Node is this node's name.
	Node string
	// Interface is the serviceInterface ("" with InterfaceErr when it
	// could not be told).
	Interface    string
	InterfaceErr error
	// SNAT selects the firewall backend, as the daemon does.
	SNAT snat.Config
	Log  *logrus.Entry
}

// Read reads the kernel; every part that fails says why in its error
// field, the others are read all the same.
func Read(ctx context.Context, cfg Config) *explain.Local {
	l := &explain.Local{Node: cfg.Node, Interface: cfg.Interface}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	switch addrs, err := netif.New(netif.Config{Interface: cfg.Interface, Log: cfg.Log}); {
	case cfg.InterfaceErr != nil:
		l.HostError, l.OwnedError = cfg.InterfaceErr.Error(), cfg.InterfaceErr.Error()
	case err != nil:
		l.HostError, l.OwnedError = err.Error(), err.Error()
	default:
		if h, err := addrs.Host(); err != nil {
			l.HostError = err.Error()
		} else {
			l.Host = &model.Host{Own: h.Own, Subnets: h.Subnets, Gateways: h.Gateways, Up: h.Up}
		}
		if owned, err := addrs.Owned(); err != nil {
			l.OwnedError = err.Error()
		} else {
			l.Owned = owned
		}
	}
	cfg.SNAT.Log = cfg.Log
	if m, err := snat.New(cfg.SNAT); err != nil {
		l.FirewallError = err.Error()
	} else {
		l.Backend = m.Backend()
		if svcs, err := m.Services(ctx); err != nil {
			l.FirewallError = err.Error()
		} else {
			l.FirewallServices = svcs
		}
	}
	rules, err := steeringRules()
	if err != nil {
		l.RulesError = err.Error()
	}
	l.Rules = rules
	return l
}

// steeringRules lists the ip rules with egressvip's protocol, both
// families, with the routes of their tables.
func steeringRules() ([]explain.LocalRule, error) {
	var rules []netlink.Rule
	err := retry(func() (err error) {
		rules, err = netlink.RuleList(netlink.FAMILY_ALL)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list ip rules: %w", err)
	}
	var out []explain.LocalRule
	routes := map[int][]string{}
	for _, r := range rules {
		if r.Protocol != steer.Proto || r.Src == nil {
			continue
		}
		a, ok := netip.AddrFromSlice(r.Src.IP)
		if !ok {
			continue
		}
		bits, _ := r.Src.Mask.Size()
		lr := explain.LocalRule{Priority: r.Priority, Src: netip.PrefixFrom(a.Unmap(), bits), Mark: r.Mark, Table: r.Table}
		if r.Mask != nil {
			lr.Mask = *r.Mask
		}
		if _, done := routes[r.Table]; !done {
			rs, err := tableRoutes(r.Table)
			if err != nil {
				return out, err
			}
			routes[r.Table] = rs
		}
		lr.Routes = routes[r.Table]
		out = append(out, lr)
	}
	slices.SortFunc(out, func(x, y explain.LocalRule) int { return x.Src.Addr().Compare(y.Src.Addr()) })
	return out, nil
}

// tableRoutes are one table's routes, as `ip route show table` prints them
// (without the table).
func tableRoutes(table int) ([]string, error) {
	var routes []netlink.Route
	err := retry(func() (err error) {
		routes, err = netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list routes of table %d: %w", table, err)
	}
	var out []string
	for _, r := range routes {
		parts := []string{"default"}
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones > 0 {
				parts[0] = r.Dst.String()
			}
		}
		if r.Gw != nil {
			parts = append(parts, "via", r.Gw.String())
		}
		if r.LinkIndex > 0 {
			if link, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
				parts = append(parts, "dev", link.Attrs().Name)
			}
		}
		if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
			parts = append(parts, "onlink")
		}
		out = append(out, strings.Join(parts, " "))
	}
	slices.Sort(out)
	return out, nil
}

// retry repeats a dump the kernel interrupted (it changed meanwhile).
func retry(dump func() error) error {
	var err error
	for range 5 {
		if err = dump(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return err
}
