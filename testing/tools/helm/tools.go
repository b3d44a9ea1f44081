//go:build tools

// Package helm pins the helm CLI the chart's tests run (helm lint, helm
// template). It is its own module so that Helm's dependencies never enter
// egressvip's graph; testing/helmtool builds the command into a cache.
package helm

import (
	_ "helm.sh/helm/v4/cmd/helm"
)
