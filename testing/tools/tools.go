//go:build tools

// Package tools pins the Kubernetes control plane and the kube-proxy the
// sandbox cluster runs.
// It is its own module so that k8s.io/kubernetes never enters egressvip's
// dependency graph; testing/sandbox builds its commands into a cache.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
