"""The segments service: gRPC server, storage, filter compiler and membership tracker."""
