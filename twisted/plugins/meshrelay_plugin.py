from twisted.application.service import ServiceMaker

meshrelay = ServiceMaker("meshrelay", "meshrelay.tap", "A store-and-forward relay node for end-to-end-encrypted DMs", "meshrelay")
