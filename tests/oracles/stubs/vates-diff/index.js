module.exports = function () {
  throw new Error("@vates/diff is not available here (not in the registry mirror)");
};
